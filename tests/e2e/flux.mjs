// Runs the real `flux` binary for the end-to-end tests (on an apps file of its own where a test needs
// one), and the small waiting helpers they share.
//
// The gateway is started on a free loopback port with two workers, so subscriptions, publishes and
// occupancy really cross worker threads, and is stopped with SIGTERM, which must exit 0.
import assert from "node:assert/strict";
import PusherClient from "pusher-js";
import PusherServer from "pusher";
import { spawn } from "node:child_process";
import fs from "node:fs";
import https from "node:https";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));

/** The binary under test: $FLUX_BIN, or the debug build of this checkout. */
export const FLUX_BIN = process.env.FLUX_BIN ?? path.join(here, "..", "..", "target", "debug", "flux");

/** The app every gateway here serves (the defaults, passed explicitly so the tests say them). */
export const APP = { appId: "app-id", key: "app-key", secret: "app-secret" };

/** The activity timeout given to the gateway, not its default, so clients show it is passed on. */
export const ACTIVITY_TIMEOUT = 42;

const START_TIMEOUT_MS = 10_000;
const STOP_TIMEOUT_MS = 10_000;

/** Resolves after `ms` milliseconds. */
export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * A port nothing listens on right now: the kernel picks one and we release it at once. Telling the
 * gateway its port spares us reading it back from the log, as FLUX_PORT=0 would need.
 */
function freePort() {
  return new Promise((resolve, reject) => {
    const probe = net.createServer();
    probe.on("error", reject);
    probe.listen(0, "127.0.0.1", () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

async function answers(port, ca) {
  if (ca) return answersOverTls(port, ca);
  try {
    const response = await fetch(`http://127.0.0.1:${port}/`, { signal: AbortSignal.timeout(1000) });
    await response.body?.cancel();
    return response.status === 200;
  } catch {
    return false; // Not listening yet.
  }
}

/** `GET /` over https, trusting the authority `ca` (PEM); fetch takes no CA of its own. */
function answersOverTls(port, ca) {
  return new Promise((resolve) => {
    const request = https.get({ host: "127.0.0.1", port, path: "/", ca, timeout: 1000 }, (response) => {
      response.resume();
      resolve(response.statusCode === 200);
    });
    request.on("error", () => resolve(false)); // Not listening yet.
    request.on("timeout", () => request.destroy());
  });
}

/** The environment every gateway here starts with, before a test's own settings. */
function fluxEnv(port, env) {
  return {
    ...process.env,
    FLUX_HOST: "127.0.0.1",
    FLUX_PORT: String(port),
    // Any free port: several gateways run at once here, and 8080 may be taken.
    FLUX_DASHBOARD_PORT: "0",
    FLUX_WORKERS: "2",
    FLUX_APP_ID: APP.appId,
    FLUX_APP_KEY: APP.key,
    FLUX_APP_SECRET: APP.secret,
    FLUX_ACTIVITY_TIMEOUT: String(ACTIVITY_TIMEOUT),
    RUST_LOG: "info",
    ...env,
  };
}

/**
 * Starts a gateway and waits until `GET /` answers 200 (over https trusting `ca` when the gateway
 * is given a certificate). Returns `{ port, log(), kill(), stop() }`; `stop()` sends SIGTERM and
 * asserts a clean exit: code 0 and no panic in the log. `args` are command-line flags
 * (`["--apps-file", path]`).
 */
export async function startFlux(env = {}, { args = [], ca } = {}) {
  const port = await freePort();
  const child = spawn(FLUX_BIN, args, { env: fluxEnv(port, env), stdio: ["ignore", "ignore", "pipe"] });
  let log = "";
  child.stderr.on("data", (chunk) => (log += chunk));
  let exit = null; // How the process ended, once it has: { code, signal }, or { error } if it never ran.
  const exited = new Promise((resolve) => {
    const ended = (outcome) => resolve((exit = outcome));
    child.on("error", (error) => ended({ error }));
    child.on("exit", (code, signal) => ended({ code, signal }));
  });

  const deadline = Date.now() + START_TIMEOUT_MS;
  while (!(await answers(port, ca))) {
    if (exit || Date.now() > deadline) {
      child.kill("SIGKILL");
      throw new Error(`flux (${FLUX_BIN}) did not start on port ${port}: ${JSON.stringify(exit)}\n${log}`);
    }
    await sleep(50);
  }

  return {
    port,
    log: () => log,
    /** Sends `signal` (SIGKILL, SIGSTOP, SIGHUP, ...) and, for SIGKILL, resolves once the process is gone. */
    async kill(signal = "SIGKILL") {
      child.kill(signal);
      if (signal === "SIGKILL") await exited;
    },
    async stop() {
      child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), STOP_TIMEOUT_MS);
      const { code, signal } = await exited;
      clearTimeout(timer);
      assert.deepEqual({ code, signal }, { code: 0, signal: null }, `flux did not exit 0 on SIGTERM:\n${log}`);
      assert.doesNotMatch(log, /panicked/, "flux panicked");
    },
  };
}

/**
 * Runs a gateway that is expected not to start: resolves with `{ code, signal, log }` once it
 * exits, or rejects (after SIGKILL) if it is still running after `ms`.
 */
export async function fluxExit(env = {}, { args = [], ms = START_TIMEOUT_MS } = {}) {
  const port = await freePort();
  const child = spawn(FLUX_BIN, args, { env: fluxEnv(port, env), stdio: ["ignore", "pipe", "pipe"] });
  let log = "";
  child.stdout.on("data", (chunk) => (log += chunk));
  child.stderr.on("data", (chunk) => (log += chunk));
  const exited = new Promise((resolve) => {
    child.on("error", (error) => resolve({ error }));
    // "close", not "exit": by then both pipes are read to their end, so the log is whole.
    child.on("close", (code, signal) => resolve({ code, signal }));
  });
  const timer = setTimeout(() => child.kill("SIGKILL"), ms);
  const outcome = await exited;
  clearTimeout(timer);
  if (outcome.signal === "SIGKILL") throw new Error(`flux was still running after ${ms} ms:\n${log}`);
  return { ...outcome, log };
}

/**
 * An apps file (TOML) of its own in a fresh temp directory. Returns `{ path, write(text),
 * remove() }`; `remove()` deletes the directory.
 */
export function appsFile(text) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "flux-e2e-apps-"));
  const file = path.join(dir, "apps.toml");
  fs.writeFileSync(file, text);
  return {
    path: file,
    /** Replaces the file's text in one step (a rename), so a reload never reads half of it. */
    write(next) {
      fs.writeFileSync(`${file}.next`, next);
      fs.renameSync(`${file}.next`, file);
    },
    remove: () => fs.rmSync(dir, { recursive: true, force: true }),
  };
}

/**
 * A redis-server of our own on a free loopback port, with nothing saved to disk. Returns
 * `{ url, kill(), restart() }`; `kill()` is SIGKILL, `restart()` starts it again on the same port.
 */
export async function startRedis() {
  const port = await freePort();
  let child;
  const up = async () => {
    child = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], { stdio: "ignore" });
    const deadline = Date.now() + START_TIMEOUT_MS;
    while (!(await redisAnswers(port))) {
      if (Date.now() > deadline) throw new Error(`redis-server did not answer on port ${port}`);
      await sleep(20);
    }
  };
  const kill = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    const gone = new Promise((resolve) => child.on("exit", resolve));
    child.kill("SIGKILL");
    await gone;
  };
  await up();
  return { url: `redis://127.0.0.1:${port}`, kill, restart: async () => (await kill(), await up()) };
}

function redisAnswers(port) {
  return new Promise((resolve) => {
    const socket = net.connect(port, "127.0.0.1", () => socket.write("PING\r\n"));
    socket.setTimeout(500, () => (socket.destroy(), resolve(false)));
    socket.on("data", (data) => (socket.destroy(), resolve(data.toString().startsWith("+PONG"))));
    socket.on("error", () => resolve(false));
  });
}

/** Resolves with the data of the next `event` on a pusher-js channel or connection, or rejects after `ms`. */
export function once(bindable, event, ms = 5000) {
  return new Promise((resolve, reject) => {
    const handler = (data) => {
      clearTimeout(timer);
      bindable.unbind(event, handler);
      resolve(data);
    };
    const timer = setTimeout(() => {
      bindable.unbind(event, handler);
      reject(new Error(`timed out after ${ms} ms waiting for ${event}`));
    }, ms);
    bindable.bind(event, handler);
  });
}

/** Polls `check` until it returns something truthy, which it resolves with, or rejects after `ms`. */
export async function eventually(check, ms = 5000, what = "a condition") {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(20);
  }
}

/**
 * The `Origin` header pusher-js sends, by app key. pusher-js 8 in Node opens its sockets with
 * faye-websocket and takes no socket options, so the one seam is its runtime's
 * `createWebSocket(url)`: wrapped here to add the header for the key the URL names.
 *
 * The wrapper also makes `close()` of a socket that is already closed do nothing. After a server
 * closes a connected client with 4000-4099, pusher-js closes the socket again, and faye-websocket
 * then arms a 30 s close timer that nothing clears: harmless, but it keeps node alive 30 s.
 */
const origins = new Map();
const createWebSocket = PusherClient.Runtime.createWebSocket;
PusherClient.Runtime.createWebSocket = function (url) {
  const origin = origins.get(new URL(url).pathname.split("/").pop());
  const Socket = this.getWebSocketAPI();
  const socket = origin === undefined ? createWebSocket.call(this, url) : new Socket(url, [], { headers: { Origin: origin } });
  const close = socket.close;
  socket.close = function (...args) {
    if (this.readyState !== 3) close.apply(this, args); // 3: CLOSED, as in the WebSocket API.
  };
  return socket;
};

/**
 * A pusher-js client of the gateway on `port`, on plain WebSocket only. Private channels are
 * authorized, and users signed in, by the official server SDK (`authorizer`), as an app's auth
 * endpoint would do; presence members are `user` with `{ name }` as their info. With `origin`,
 * its sockets send that `Origin` header, as a browser on that page would; without, none (the
 * header goes by key, so it is the latest client of a key that decides it for the key's sockets).
 */
export function newPusherClient(port, { key = APP.key, authorizer = newPusherServer(port), user = { id: "user-1" }, origin } = {}) {
  if (origin === undefined) origins.delete(key);
  else origins.set(key, origin);
  return new PusherClient(key, {
    wsHost: "127.0.0.1",
    wsPort: port,
    forceTLS: false,
    enabledTransports: ["ws"],
    cluster: "mt1",
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, callback) => {
        const member = channelName.startsWith("presence-") ? { user_id: user.id, user_info: { name: user.name ?? user.id } } : undefined;
        callback(null, authorizer.authorizeChannel(socketId, channelName, member));
      },
    },
    userAuthentication: {
      customHandler: ({ socketId }, callback) => callback(null, authorizer.authenticateUser(socketId, user)),
    },
  });
}

/** The official server SDK, pointed at the gateway on `port`, for `app` (`{ appId, key, secret }`), signing with `secret`. */
export function newPusherServer(port, secret = APP.secret, app = APP) {
  return new PusherServer({ appId: app.appId, key: app.key, secret, host: "127.0.0.1", port: String(port), useTLS: false });
}

/** Resolves with `pusher` once it is connected. */
export async function connected(pusher) {
  if (pusher.connection.state !== "connected") await once(pusher.connection, "connected");
  return pusher;
}

/** Subscribes `pusher` to `name` and resolves with the channel once it is confirmed. */
export async function subscribed(pusher, name) {
  const channel = pusher.subscribe(name);
  await once(channel, "pusher:subscription_succeeded");
  return channel;
}

/** Records every `event` on `channel`, in arrival order. */
export function record(channel, event) {
  const received = [];
  channel.bind(event, (data) => received.push(data));
  return received;
}
