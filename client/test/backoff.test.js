// herald-client against sick servers (issue 17): a server that accepts and
// then closes at once must see retries slow down to backoffMax, not a fresh
// attempt every backoffInitial; a 4001 loop must not become a hot loop; and
// only a connection that proved healthy starts the backoff over.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';

import { CloseCode, HeraldClient } from '../herald-client.js';
import { closingServer, next, proxy, startHerald, token, uuid } from './support.js';

let herald;
before(async () => {
  herald = await startHerald();
});
after(() => herald?.stop());

// Small enough for a test to see the backoff reach its ceiling in a second.
const INITIAL = 50;
const MAX = 400;
const HEALTHY = 500;

/** A client with fast timers, closed when the test ends. */
function client(t, url, options) {
  const c = new HeraldClient(url, {
    backoffInitial: INITIAL,
    backoffMax: MAX,
    healthyAfter: HEALTHY,
    connectTimeout: 2000,
    ...options,
  });
  t.after(() => c.close());
  return c;
}

/** Records what a client does: when each attempt starts, and each
 * disconnect, until `stop()` (before the test closes the client, whose own
 * close would add a 1000). */
function watch(c) {
  const seen = { attempts: [], disconnects: [], errors: [] };
  const offs = [
    c.on('connecting', ({ attempt }) => seen.attempts.push({ at: performance.now(), attempt })),
    c.on('disconnected', (d) => seen.disconnects.push(d)),
    c.on('error', (e) => seen.errors.push(e)),
  ];
  seen.stop = () => offs.forEach((off) => off());
  return seen;
}

const gaps = (attempts) => attempts.slice(1).map((a, i) => a.at - attempts[i].at);

// Node's timers may fire a millisecond early against performance.now().
const SLACK = 5;

test('a server that accepts and closes at once (1011) sees the backoff grow to backoffMax', async (t) => {
  const sick = await closingServer(1011, 'event bus unavailable');
  t.after(() => sick.close());
  const c = client(t, sick.wsUrl, { token: 'any', healthyAfter: 1000 });
  const seen = watch(c);
  c.connect();
  await sleep(3000);
  seen.stop();
  c.close();

  const n = seen.attempts.length;
  // Doubling from 50 ms to 400 ms: 25-50, 50-100, 100-200, then 200-400 ms
  // each, so about a dozen in 3 s; a counter reset on every open would make
  // it a fresh 25-50 ms delay each time, 60 or more.
  assert.ok(n >= 6 && n <= 20, `${n} attempts in 3 s`);
  // (The attempt under way when the client closed may not have reached it.)
  assert.ok(n - sick.upgrades.length <= 1, `${sick.upgrades.length} upgrades for ${n} attempts`);
  assert.deepEqual(
    seen.attempts.map((a) => a.attempt),
    seen.attempts.map((_, i) => i),
    'every attempt counts as failed',
  );
  gaps(seen.attempts).forEach((gap, i) => {
    const ceiling = Math.min(MAX, INITIAL * 2 ** i);
    assert.ok(gap >= ceiling / 2 - SLACK, `interval ${i} was ${gap} ms, under half its ceiling ${ceiling}`);
  });
  const late = gaps(seen.attempts).slice(3);
  assert.ok(late.length >= 3 && late.every((gap) => gap >= MAX / 2 - SLACK), `late intervals ${late}`);
  for (const d of seen.disconnects) {
    assert.equal(d.code, 1011);
    assert.ok(d.delay <= MAX, `delay ${d.delay} above backoffMax`);
  }
});

test('a 4001 loop with getToken() returning the same cached token is no hot loop', async (t) => {
  const sick = await closingServer(CloseCode.TOKEN_EXPIRED, 'token expired');
  t.after(() => sick.close());
  const cached = 'cached-token';
  let calls = 0;
  const c = client(t, sick.wsUrl, {
    getToken: () => {
      calls += 1;
      return cached;
    },
  });
  const seen = watch(c);
  c.connect();
  await sleep(2000);
  seen.stop();
  c.close();

  // The server expired that token once; it is never sent to it again.
  assert.equal(sick.upgrades.length, 1, `${sick.upgrades.length} upgrades with the expired token`);
  const n = seen.attempts.length;
  assert.ok(n >= 4 && n <= 20, `${n} attempts in 2 s`);
  assert.equal(calls, n, 'every attempt asked getToken() again');
  assert.equal(seen.disconnects[0].code, CloseCode.TOKEN_EXPIRED);
  assert.ok(seen.disconnects[0].delay <= INITIAL, `renewal delay ${seen.disconnects[0].delay}`);
  assert.ok(seen.errors.some((e) => e.code === 'token'), 'the stale token is reported');
  // After the renewal, each attempt that got the same token back failed and backed off.
  const late = gaps(seen.attempts).slice(4);
  assert.ok(late.length >= 1 && late.every((gap) => gap >= MAX / 2 - SLACK), `late intervals ${late}`);
});

test('4001 again and again with fresh tokens: one prompt renewal, then backoff', async (t) => {
  const sick = await closingServer(CloseCode.TOKEN_EXPIRED, 'token expired');
  t.after(() => sick.close());
  let calls = 0;
  const c = client(t, sick.wsUrl, { getToken: () => `fresh-${++calls}` });
  const seen = watch(c);
  c.connect();
  await sleep(2500);
  seen.stop();
  c.close();

  const n = sick.upgrades.length;
  assert.ok(n >= 5 && n <= 20, `${n} upgrades in 2.5 s`);
  assert.equal(new Set(sick.upgrades.map((u) => u.url)).size, n, 'a new token each time');
  const delays = seen.disconnects.map((d) => d.delay);
  assert.deepEqual(
    seen.disconnects.filter((d) => d.code !== CloseCode.TOKEN_EXPIRED),
    [],
    'every connection closed with 4001',
  );
  assert.ok(delays[0] >= 0 && delays[0] <= INITIAL, `first renewal after ${delays[0]} ms`);
  // The second 4001 in a row is a failed attempt: 25-50, 50-100, 100-200, then 200-400 ms.
  delays.slice(1).forEach((delay, i) => {
    const ceiling = Math.min(MAX, INITIAL * 2 ** i);
    assert.ok(delay >= ceiling / 2 && delay <= ceiling, `delay ${i + 1} was ${delay}, ceiling ${ceiling}`);
  });
  assert.ok(delays.slice(4).length >= 1, `delays ${delays}`);
});

/** Makes the node behind `p` sick (every new connection closed with 1011)
 * until the client's backoff reaches its ceiling. */
async function backOffFully(c, p) {
  // 25-50, 50-100, 100-200, then 200-400 ms: well within 3 s.
  const slow = next(c, 'disconnected', (d) => d.delay >= MAX / 2, 3000);
  p.sicken(1011);
  await slow.catch(() => assert.fail('the backoff did not grow against a node that closes every connection with 1011'));
}

/** Cuts the client's connection (the node stays sick until `p.reopen()`);
 * resolves with the delay the client chose. */
async function cutDelay(c, p) {
  const gone = next(c, 'disconnected');
  p.sicken(1011);
  return (await gone).delay;
}

test('only a healthy connection (open past healthyAfter, every room acked) starts the backoff over', async (t) => {
  const p = await proxy(herald.addr);
  t.after(() => p.close());
  const chat = uuid();
  const c = client(t, p.wsUrl, { token: token(uuid(), [chat]) });
  await c.connect();
  await c.subscribe(chat, () => {});
  await backOffFully(c, p);

  // Open and acked, but closed before healthyAfter: still failing.
  let acked = next(c, 'subscribed');
  p.reopen();
  await acked;
  const early = await cutDelay(c, p);
  assert.ok(early >= MAX / 2, `a connection closed after its ack but before healthyAfter: delay ${early}`);

  // Open past healthyAfter, but its resubscribe never acknowledged: still failing.
  const lost = p.drop((m) => m.type === 'subscribed' && m.chat_id === chat);
  p.reopen();
  await lost;
  await sleep(HEALTHY + 300);
  const unacked = await cutDelay(c, p);
  assert.ok(unacked >= MAX / 2, `a connection with a room never acked: delay ${unacked}`);

  // Acked and open past healthyAfter: the next reconnect starts from backoffInitial.
  acked = next(c, 'subscribed');
  p.reopen();
  await acked;
  await sleep(HEALTHY + 300);
  const healthy = await cutDelay(c, p);
  assert.ok(healthy <= INITIAL, `after a healthy connection: delay ${healthy}`);
  const attempt = next(c, 'connecting');
  assert.equal((await attempt).attempt, 1, 'one failure since the healthy connection');
});

test('a connection without rooms is healthy once open past healthyAfter', async (t) => {
  const p = await proxy(herald.addr);
  t.after(() => p.close());
  const c = client(t, p.wsUrl, { token: token(uuid(), []) });
  await c.connect();
  await backOffFully(c, p);

  let connected = next(c, 'connected');
  p.reopen();
  await connected;
  await sleep(HEALTHY / 4);
  const early = await cutDelay(c, p);
  assert.ok(early >= MAX / 2, `closed before healthyAfter: delay ${early}`);

  connected = next(c, 'connected');
  p.reopen();
  await connected;
  await sleep(HEALTHY + 300);
  const healthy = await cutDelay(c, p);
  assert.ok(healthy <= INITIAL, `after a healthy connection: delay ${healthy}`);
});
