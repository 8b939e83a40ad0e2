// Runs the real `flux` binary for the end-to-end tests, and the small waiting helpers they share.
//
// The gateway is started on a free loopback port with two workers, so subscriptions, publishes and
// occupancy really cross worker threads, and is stopped with SIGTERM, which must exit 0.
import assert from "node:assert/strict";
import PusherClient from "pusher-js";
import PusherServer from "pusher";
import { spawn } from "node:child_process";
import https from "node:https";
import net from "node:net";
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

/**
 * Starts a gateway and waits until `GET /` answers 200 (over https trusting `ca` when the gateway
 * is given a certificate). Returns `{ port, log(), stop() }`; `stop()` sends SIGTERM and asserts a
 * clean exit: code 0 and no panic in the log.
 */
export async function startFlux(env = {}, { ca } = {}) {
  const port = await freePort();
  const child = spawn(FLUX_BIN, [], {
    env: {
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
    },
    stdio: ["ignore", "ignore", "pipe"],
  });
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
    /** Sends `signal` (SIGKILL, SIGSTOP, ...) and, for SIGKILL, resolves once the process is gone. */
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
 * A pusher-js client of the gateway on `port`, on plain WebSocket only. Private channels are
 * authorized, and users signed in, by the official server SDK (`authorizer`), as an app's auth
 * endpoint would do; presence members are `user` with `{ name }` as their info.
 */
export function newPusherClient(port, { key = APP.key, authorizer = newPusherServer(port), user = { id: "user-1" } } = {}) {
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

/** The official server SDK, pointed at the gateway on `port`. */
export function newPusherServer(port, secret = APP.secret) {
  return new PusherServer({ ...APP, secret, host: "127.0.0.1", port: String(port), useTLS: false });
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
