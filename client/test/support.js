// Test support for herald-client: starts a real Herald process, mints
// tokens, publishes over HTTP, and a TCP proxy that can lose or repeat
// server frames or go silent (a broken network path), so the client's
// recovery logic is tested against the real server. A sick node, one that
// accepts every WebSocket and closes it at once, is played by the proxy
// (`sicken`) or by a bare server (`closingServer`).

import { spawn, spawnSync } from 'node:child_process';
import { createHash, createHmac, randomUUID } from 'node:crypto';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const SECRET = 'client-test-secret-0123456789';
export const API_KEY = 'client-test-api-key-0123456789';
export const uuid = () => randomUUID();

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

/** The herald binary: $SERVER_BIN (set by .ci/run), else a debug build made here. */
function heraldBin() {
  if (process.env.SERVER_BIN) return process.env.SERVER_BIN;
  const build = spawnSync('cargo', ['build', '-q', '-p', 'herald', '--bin', 'herald'], { cwd: repo, stdio: 'inherit' });
  if (build.status !== 0) throw new Error('cargo build -p herald failed');
  return path.join(process.env.CARGO_TARGET_DIR || path.join(repo, 'target'), 'debug', 'herald');
}
let bin;

/**
 * Starts Herald on 127.0.0.1:`port` (0: any) with the test secret and API
 * key; resolves once it listens. `env` adds HERALD_* overrides.
 */
export async function startHerald({ port = 0, env = {} } = {}) {
  bin ??= heraldBin();
  // Only our own HERALD_* variables: the parent's could change the config.
  const base = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('HERALD_')));
  const child = spawn(bin, [], {
    env: {
      ...base,
      NO_COLOR: '1',
      RUST_LOG: 'herald=info',
      HERALD_SERVER__LISTEN: `127.0.0.1:${port}`,
      HERALD_SERVER__SHUTDOWN_GRACE: '2s',
      HERALD_AUTH__JWT_SECRET: SECRET,
      HERALD_API__KEYS: API_KEY,
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let log = '';
  const addr = await new Promise((resolve, reject) => {
    const onData = (chunk) => {
      log += chunk;
      // eslint-disable-next-line no-control-regex
      const m = log.replace(/\x1b\[[0-9;]*m/g, '').match(/herald listening.*?addr=(127\.0\.0\.1:\d+)/);
      if (m) resolve(m[1]);
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.on('exit', (code) => reject(new Error(`herald exited (${code}) before listening:\n${log}`)));
  });
  const exited = new Promise((resolve) => child.on('exit', resolve));
  return {
    addr,
    port: Number(addr.split(':')[1]),
    wsUrl: `ws://${addr}/ws`,
    /** Graceful stop (SIGTERM: every socket gets 1001); resolves on exit. */
    stop() {
      child.kill('SIGTERM');
      return exited;
    },
    publish: (event) => publish(addr, event),
  };
}

export async function publish(addr, event) {
  const resp = await fetch(`http://${addr}/api/events`, {
    method: 'POST',
    headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
    body: JSON.stringify(event),
  });
  if (resp.status !== 202) throw new Error(`publish answered ${resp.status}: ${await resp.text()}`);
  return resp.json();
}

export function message(chatId, n) {
  return { type: 'message.sent', chat_id: chatId, data: { n } };
}

const b64 = (v) => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url');

/** An HS256 JWT for `sub` with the `chats` claim, expiring in `ttl` seconds. */
export function token(sub, chats, ttl = 3600) {
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub, chats, exp: Math.floor(Date.now() / 1000) + ttl })}`;
  return `${body}.${createHmac('sha256', SECRET).update(body).digest('base64url')}`;
}

/** Resolves with the next value `client` emits as `name` that passes `pred`. */
export function next(client, name, pred = () => true, ms = 10000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no '${name}' within ${ms} ms`));
    }, ms);
    const off = client.on(name, (v) => {
      if (!pred(v)) return;
      clearTimeout(timer);
      off();
      resolve(v);
    });
  });
}

/** A queue of a room's events: `await q.take()` returns the next one. */
export function inbox() {
  const items = [];
  const waiting = [];
  return {
    push(v) {
      const w = waiting.shift();
      if (w) w(v);
      else items.push(v);
    },
    take(ms = 10000) {
      if (items.length) return Promise.resolve(items.shift());
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no event within ${ms} ms`)), ms);
        waiting.push((v) => {
          clearTimeout(timer);
          resolve(v);
        });
      });
    },
    get pending() {
      return items.length;
    },
  };
}

/**
 * A TCP proxy in front of Herald that parses the server's frames (unmasked,
 * so easy to cut) and lets a test drop or repeat the next matching text
 * frame, or stop forwarding altogether (a dead path that never closes).
 */
export async function proxy(target) {
  const [host, port] = target.split(':');
  const rules = [];
  const sockets = new Set();
  let silent = false;
  let refusing = false;
  let sickCode = 0;
  const server = net.createServer((client) => {
    if (refusing) return client.destroy();
    if (sickCode) {
      sockets.add(client);
      return acceptAndClose(client, sickCode);
    }
    const upstream = net.connect(Number(port), host);
    sockets.add(client).add(upstream);
    const closeBoth = () => {
      client.destroy();
      upstream.destroy();
    };
    client.on('error', closeBoth).on('close', closeBoth);
    upstream.on('error', closeBoth).on('close', closeBoth);
    client.on('data', (d) => silent || upstream.write(d));
    let buf = Buffer.alloc(0);
    let upgraded = false;
    upstream.on('data', (d) => {
      if (silent) return;
      buf = Buffer.concat([buf, d]);
      if (!upgraded) {
        const end = buf.indexOf('\r\n\r\n');
        if (end < 0) return;
        client.write(buf.subarray(0, end + 4));
        buf = buf.subarray(end + 4);
        upgraded = true;
      }
      for (;;) {
        const frame = cutFrame(buf);
        if (!frame) return;
        buf = buf.subarray(frame.length);
        const bytes = frame.bytes;
        const text = frame.opcode === 1 ? frame.payload.toString() : null;
        const rule = text === null ? -1 : rules.findIndex((r) => r.pred(JSON.parse(text)));
        if (rule < 0) {
          client.write(bytes);
          continue;
        }
        const [{ action, resolve }] = rules.splice(rule, 1);
        if (action === 'repeat') client.write(Buffer.concat([bytes, bytes]));
        resolve(JSON.parse(text));
      }
    });
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const addr = `127.0.0.1:${server.address().port}`;
  const rule = (action) => (pred) => new Promise((resolve) => rules.push({ action, pred, resolve }));
  return {
    wsUrl: `ws://${addr}/ws`,
    /** Drops the next server text frame matching `pred`; resolves with it. */
    drop: rule('drop'),
    /** Sends the next matching server text frame twice; resolves with it. */
    repeat: rule('repeat'),
    /** Stops forwarding both ways without closing anything. */
    goSilent() {
      silent = true;
    },
    /** Cuts every connection (the client sees 1006) and refuses new ones until `reopen()`. */
    cut() {
      refusing = true;
      for (const s of sockets) s.destroy();
      sockets.clear();
    },
    /** Cuts every connection and, until `reopen()`, accepts new ones and
     * closes them at once with `code`, as a sick node does (1011 while its
     * Redis is down). Unlike a refusal, which Node 20's WebSocket reports
     * only through `error` (the client then waits for its connectTimeout),
     * the client sees each close at once. */
    sicken(code) {
      sickCode = code;
      for (const s of sockets) s.destroy();
      sockets.clear();
    },
    reopen() {
      refusing = false;
      sickCode = 0;
    },
    close() {
      for (const s of sockets) s.destroy();
      return new Promise((r) => server.close(r));
    },
  };
}

/** One complete server frame at the start of `buf`, or null. */
function cutFrame(buf) {
  if (buf.length < 2) return null;
  const opcode = buf[0] & 0x0f;
  let len = buf[1] & 0x7f;
  let off = 2;
  if (len === 126) {
    if (buf.length < 4) return null;
    len = buf.readUInt16BE(2);
    off = 4;
  } else if (len === 127) {
    if (buf.length < 10) return null;
    len = Number(buf.readBigUInt64BE(2));
    off = 10;
  }
  if (buf.length < off + len) return null;
  return { opcode, length: off + len, bytes: buf.subarray(0, off + len), payload: buf.subarray(off, off + len) };
}

/**
 * Answers the WebSocket upgrade on `socket` and closes the connection at once
 * with `code`; the TCP connection goes once the client's close frame
 * arrives, or after 2 s without it (Herald does the same).
 */
function acceptAndClose(socket, code, reason = '') {
  socket.on('error', () => socket.destroy());
  let head = '';
  const onHead = (d) => {
    head += d.toString('latin1');
    if (!head.includes('\r\n\r\n')) return;
    socket.off('data', onHead);
    const key = head.match(/^sec-websocket-key:\s*(\S+)/im)?.[1] ?? '';
    const accept = createHash('sha1').update(`${key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`).digest('base64');
    const why = Buffer.from(reason);
    const payload = Buffer.alloc(2 + why.length);
    payload.writeUInt16BE(code);
    why.copy(payload, 2);
    socket.write(
      `HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`,
    );
    socket.write(Buffer.concat([Buffer.from([0x88, payload.length]), payload]));
    socket.once('data', () => socket.end());
    setTimeout(() => socket.destroy(), 2000).unref();
  };
  socket.on('data', onHead);
}

/**
 * A WebSocket server on 127.0.0.1 that accepts every upgrade and closes it at
 * once with `code`: a sick node (1011 while its Redis is down, 4001 for a
 * token it holds expired). `upgrades` records each one: `at`
 * (performance.now()) and the request's `url` (which carries the token).
 */
export async function closingServer(code, reason = '') {
  const upgrades = [];
  const sockets = new Set();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.once('data', (d) => {
      upgrades.push({ at: performance.now(), url: d.toString('latin1').split(' ')[1] });
    });
    acceptAndClose(socket, code, reason);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return {
    wsUrl: `ws://127.0.0.1:${server.address().port}/ws`,
    upgrades,
    close() {
      for (const s of sockets) s.destroy();
      return new Promise((r) => server.close(r));
    },
  };
}
