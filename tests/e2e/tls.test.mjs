// Flux terminating TLS on its main port, against pusher-js with `forceTLS: true` and the official
// `pusher` SDK with `useTLS: true`: the certificate is made here with `openssl` for the run, and its
// authority is trusted the way a Node app would trust it, through NODE_EXTRA_CA_CERTS. Node reads
// that variable only when it starts, so each client runs in a node process of its own.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { APP, startFlux } from "./flux.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const BOUNDED = { timeout: 30_000 };

let dir;
let flux;

/** A CA and a certificate for localhost and 127.0.0.1 signed by it, in `dir`. */
function makeCertificate() {
  const file = (name) => path.join(dir, name);
  const openssl = (...args) => execFileSync("openssl", args, { stdio: ["ignore", "ignore", "pipe"] });
  const curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
  openssl("req", "-x509", ...curve, "-days", "2", "-subj", "/CN=flux-e2e-ca", "-keyout", file("ca.key"), "-out", file("ca.pem"));
  openssl("req", ...curve, "-subj", "/CN=localhost", "-keyout", file("server.key"), "-out", file("server.csr"));
  writeFileSync(file("server.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n");
  openssl("x509", "-req", "-days", "2", "-in", file("server.csr"), "-CA", file("ca.pem"), "-CAkey", file("ca.key"),
    "-CAcreateserial", "-extfile", file("server.ext"), "-out", file("server.pem"));
}

before(async () => {
  dir = mkdtempSync(path.join(os.tmpdir(), "flux-e2e-tls-"));
  makeCertificate();
  const env = { FLUX_TLS_CERT: path.join(dir, "server.pem"), FLUX_TLS_KEY: path.join(dir, "server.key") };
  flux = await startFlux(env, { ca: readFileSync(path.join(dir, "ca.pem")) });
}, BOUNDED);

after(async () => {
  await flux?.stop();
  if (dir) rmSync(dir, { recursive: true, force: true });
}, BOUNDED);

/** Runs the ES module `script` in a node process of its own; resolves with its exit code and output. */
function runNode(script, env) {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ["--input-type=module", "-e", script], { cwd: here, env: { ...process.env, ...env } });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (chunk) => (stdout += chunk));
    child.stderr.on("data", (chunk) => (stderr += chunk));
    const timer = setTimeout(() => child.kill("SIGKILL"), 20_000);
    child.on("exit", (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

/** Publishes one event with the official SDK over https, then exits 0; exits 3 if the call fails. */
const publish = (port, channel) => `
  new PusherServer({ appId: "${APP.appId}", key: "${APP.key}", secret: "${APP.secret}", host: "127.0.0.1", port: "${port}", useTLS: true })
    .trigger("${channel}", "secure", { over: "tls" })
    .catch((error) => { console.error(String(error), String(error.error ?? "")); process.exit(3); });`;

test("pusher-js with forceTLS receives an event the pusher SDK publishes with useTLS", BOUNDED, async () => {
  const script = `
    import PusherClient from "pusher-js";
    import PusherServer from "pusher";
    const client = new PusherClient("${APP.key}", {
      wsHost: "127.0.0.1", wssPort: ${flux.port}, forceTLS: true, enabledTransports: ["ws"], cluster: "mt1",
    });
    client.connection.bind("unavailable", () => { console.error("unavailable"); process.exit(2); });
    const channel = client.subscribe("tls-room");
    channel.bind("pusher:subscription_succeeded", () => {${publish(flux.port, "tls-room")}
    });
    channel.bind("secure", (data) => {
      console.log(JSON.stringify(data));
      client.disconnect();
      process.exit(0);
    });`;
  const { code, stdout, stderr } = await runNode(script, { NODE_EXTRA_CA_CERTS: path.join(dir, "ca.pem") });
  assert.equal(code, 0, `exit ${code}: ${stderr}`);
  assert.deepEqual(JSON.parse(stdout), { over: "tls" });
});

test("without the CA the SDK's publish is refused by certificate verification: the port serves only TLS, with that certificate", BOUNDED, async () => {
  const script = `
    import PusherServer from "pusher";
    ${publish(flux.port, "tls-room")}`;
  const { code, stderr } = await runNode(script, { NODE_EXTRA_CA_CERTS: "" });
  assert.equal(code, 3, "the publish must fail");
  assert.match(stderr, /certificate|self.signed/i);
});
