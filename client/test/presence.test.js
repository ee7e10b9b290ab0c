// herald-client's presence and typing against a real Herald process: join,
// leave and typing events, presence() lists, and a fresh list (not a replay
// of joins) after a reconnect.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { HeraldClient, HeraldError } from '../herald-client.js';
import { next, proxy, startHerald, token, uuid } from './support.js';

let herald;
before(async () => {
  herald = await startHerald({
    env: { HERALD_PRESENCE__LEAVE_DELAY: '300ms', HERALD_PRESENCE__TYPING_INTERVAL: '500ms' },
  });
});
after(() => herald?.stop());

function client(t, url, user, chats) {
  const c = new HeraldClient(url, { token: token(user, chats), backoffInitial: 50, backoffMax: 500, connectTimeout: 2000 });
  t.after(() => c.close());
  return c;
}

test('joins, leaves, typing and the presence list', async (t) => {
  const chat = uuid();
  const [alice, bob] = [uuid(), uuid()].sort();
  const a = client(t, herald.wsUrl, alice, [chat]);
  const b = client(t, herald.wsUrl, bob, [chat]);
  await a.connect();
  await b.connect();
  const ownJoin = next(a, 'join', (j) => j.userId === alice);
  await a.subscribe(chat, () => {}, { presence: true });
  assert.deepEqual(await ownJoin, { chatId: chat, userId: alice });

  assert.equal(b.typing(chat), false, 'not subscribed yet: nothing sent');
  const bobJoins = next(a, 'join', (j) => j.userId === bob);
  await b.subscribe(chat, () => {});
  assert.deepEqual(await bobJoins, { chatId: chat, userId: bob });
  assert.deepEqual(await b.presence(chat), [alice, bob]);

  const typing = next(a, 'typing');
  let bobSawTyping = false;
  b.on('typing', () => {
    bobSawTyping = true;
  });
  assert.equal(b.typing(chat), true);
  assert.deepEqual(await typing, { chatId: chat, userId: bob });

  const left = next(a, 'leave');
  await b.unsubscribe(chat);
  assert.deepEqual(await left, { chatId: chat, userId: bob });
  assert.deepEqual(await a.presence(chat), [alice]);
  assert.equal(bobSawTyping, false, 'the sender does not receive its own typing');

  const forbidden = await b.presence(uuid()).catch((e) => e);
  assert.ok(forbidden instanceof HeraldError);
  assert.equal(forbidden.code, 'forbidden');
});

test('after a reconnect a presence room gets a fresh list, not a replay of joins', async (t) => {
  const p = await proxy(herald.addr);
  t.after(() => p.close());
  const chat = uuid();
  const [alice, bob] = [uuid(), uuid()];
  const a = client(t, p.wsUrl, alice, [chat]);
  await a.connect();
  const own = next(a, 'join');
  await a.subscribe(chat, () => {}, { presence: true });
  await own;

  const dropped = next(a, 'disconnected');
  p.cut();
  await dropped;
  // Bob comes while Alice is away: she does not see his join, but the list.
  const b = client(t, herald.wsUrl, bob, [chat]);
  await b.connect();
  await b.subscribe(chat, () => {});
  const fresh = next(a, 'presence');
  p.reopen();
  const list = await fresh;
  assert.equal(list.chatId, chat);
  assert.deepEqual(list.users, [alice, bob].sort());
});
