// Starts the flux binary for a test on a free loopback port, and stops it with SIGTERM.
import { spawn } from "node:child_process";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
export const FLUX_BIN = process.env.FLUX_BIN ?? path.join(here, "..", "..", "target", "debug", "flux");
export const APP = { appId: "app-id", key: "app-key", secret: "app-secret" };

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

async function answers(port) {
  try {
    const response = await fetch(`http://127.0.0.1:${port}/`);
    return response.status === 200;
  } catch {
    return false;
  }
}

/** A running gateway: `port`, `log()` and `stop()` (SIGTERM; resolves to the exit code). */
export async function startFlux(env = {}) {
  const port = await freePort();
  const child = spawn(FLUX_BIN, [], {
    env: { ...process.env, FLUX_HOST: "127.0.0.1", FLUX_PORT: String(port), FLUX_WORKERS: "2", RUST_LOG: "info", ...env },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let log = "";
  child.stderr.on("data", (chunk) => (log += chunk));
  const exited = new Promise((resolve) => child.on("exit", (code, signal) => resolve(code ?? signal)));
  for (let i = 0; i < 100 && !(await answers(port)); i++) {
    await new Promise((r) => setTimeout(r, 50));
  }
  if (!(await answers(port))) {
    child.kill("SIGKILL");
    throw new Error(`flux did not start:\n${log}`);
  }
  return {
    port,
    log: () => log,
    stop: async () => {
      child.kill("SIGTERM");
      return exited;
    },
  };
}

/** Resolves when `emitter` fires `event` (pusher-js bind style), or rejects after `ms`. */
export function once(bindable, event, ms = 5000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out waiting for ${event}`)), ms);
    bindable.bind(event, function handler(data) {
      clearTimeout(timer);
      bindable.unbind(event, handler);
      resolve(data);
    });
  });
}

/** Polls `check` until it returns a truthy value, or fails after `ms`. */
export async function eventually(check, ms = 5000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error("condition not met in time");
    await new Promise((r) => setTimeout(r, 25));
  }
}
