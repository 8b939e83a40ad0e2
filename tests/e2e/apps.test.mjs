// Several apps from one apps file (FLUX_APPS_FILE / --apps-file), with pusher-js 8 and the
// official `pusher` SDK: the same channel name in two apps is two channels and one app's secret
// reaches no other app; each app's limits answer with Pusher's codes and statuses; SIGHUP adds,
// disables, removes and changes apps without dropping anyone else, and a bad or unreadable file
// on reload changes nothing; a bad file at start stops flux with the file, the line and the reason.
import { after, afterEach, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import {
  appsFile,
  connected,
  eventually,
  fluxExit,
  newPusherClient,
  newPusherServer,
  once,
  record,
  sleep,
  startFlux,
  subscribed,
} from "./flux.mjs";

/** Every test and hook is bounded; a hang fails its test instead of stalling the run. */
const BOUNDED = { timeout: 20_000 };

/** An app of the files below, by its name: `{ appId, key, secret }`. */
const app = (name) => ({ appId: `app-${name}`, key: `key-${name}`, secret: `secret-${name}` });
const [A, B, C] = [app("a"), app("b"), app("c")];
const QUOTA = app("quota");
const WEB = app("web");
const OFF = app("off");

/** One `[[apps]]` table: `app`'s credentials, then its settings as TOML lines. */
const table = (app, ...settings) => [`[[apps]]`, `id = "${app.appId}"`, `key = "${app.key}"`, `secret = "${app.secret}"`, ...settings, ""].join("\n");

/**
 * The shared gateway's apps: A and B, the two apps, with settings that differ (client
 * events on for A only, small REST limits for B), and one app for each admission limit, so a test
 * of a quota never counts another test's clients.
 */
const TWO_APPS = [
  table(A, "enable_client_messages = true"),
  table(B, "max_event_batch_size = 2", "max_event_channels_at_once = 2", "max_event_payload_kb = 1"),
  table(QUOTA, "max_connections = 2"),
  table(WEB, 'allowed_origins = ["*.example.com", "https://app.test"]'),
  table(OFF, "enabled = false"),
].join("\n");

/** pusher-js's errors carry the code in `data`, or in `error.data` when wrapped in a WebSocketError. */
const codeOf = (error) => error?.data?.code ?? error?.error?.data?.code;

/** Clients a test opened, closed after it so no connection leaks into the next test or quota. */
const openClients = [];

function disconnectAll() {
  for (const client of openClients.splice(0)) client.disconnect();
}

/** A pusher-js client of `app` on the gateway on `port`, authorized by `app`'s own SDK. */
function clientOf(port, app, { authorizer = newPusherServer(port, app.secret, app), origin } = {}) {
  const pusher = newPusherClient(port, { key: app.key, authorizer, origin });
  openClients.push(pusher);
  return pusher;
}

/** Records every error and state change of a pusher-js connection. */
function watch(pusher) {
  const seen = { errors: [], states: [] };
  pusher.connection.bind("error", (error) => seen.errors.push(error));
  pusher.connection.bind("state_change", ({ current }) => seen.states.push(current));
  return seen;
}

/**
 * Waits until `pusher` reports an error with `code` and has disconnected, then checks that it
 * stays disconnected: 4000-4099 means "do not reconnect as is" to pusher-js.
 */
async function refusedWith(pusher, seen, code) {
  await eventually(() => seen.errors.some((error) => codeOf(error) === code), 5000, `error ${code}`).catch((error) => {
    throw new Error(`${error.message}; errors: ${JSON.stringify(seen.errors)}`);
  });
  await eventually(() => pusher.connection.state === "disconnected", 5000, "pusher-js to disconnect");
  const settled = seen.states.length;
  await sleep(1500); // pusher-js's first retry would come after 1 s at most.
  assert.equal(pusher.connection.state, "disconnected", `no reconnect after ${code}: ${seen.states.join(" -> ")}`);
  assert.deepEqual(seen.states.slice(settled), [], "no state change after the refusal");
}

/** Asserts that a promise from the SDK rejects with HTTP `status`. */
async function rejectsWith(promise, status, what) {
  await assert.rejects(promise, (error) => {
    assert.equal(error.status, status, `${what}: ${error.status} ${error.body}`);
    return true;
  });
}

describe("two apps from one apps file (pusher-js and the pusher SDK)", () => {
  let flux, file;
  /** The SDK of `app` on the shared gateway; `secret` may be another app's. */
  const sdk = (app, secret = app.secret) => newPusherServer(flux.port, secret, app);
  const client = (app, options) => clientOf(flux.port, app, options);

  before(async () => {
    file = appsFile(TWO_APPS);
    flux = await startFlux({}, { args: ["--apps-file", file.path] }); // The flag; the SIGHUP tests use FLUX_APPS_FILE.
  }, BOUNDED);

  afterEach(disconnectAll, BOUNDED);

  after(async () => {
    await flux?.stop();
    file?.remove();
  }, BOUNDED);

  test("the same channel name in two apps is two channels: each app's trigger reaches only its own subscribers", BOUNDED, async () => {
    const [a1, a2, b1] = [client(A), client(A), client(B)];
    const heard = await Promise.all([a1, a2, b1].map(async (pusher) => record(await subscribed(pusher, "news"), "story")));
    await sdk(A).trigger("news", "story", { from: "a" });
    await eventually(() => heard[0].length === 1 && heard[1].length === 1, 5000, "A's event at A's subscribers");
    await sdk(B).trigger("news", "story", { from: "b" });
    await eventually(() => heard[2].length === 1, 5000, "B's event at B's subscriber");
    await sleep(300); // Time for a stray delivery to show.
    assert.deepEqual(heard, [[{ from: "a" }], [{ from: "a" }], [{ from: "b" }]]);

    // Each app's REST API counts its own subscribers only.
    const count = async (app) => (await (await sdk(app).get({ path: "/channels/news", params: { info: "subscription_count" } })).json()).subscription_count;
    assert.deepEqual([await count(A), await count(B)], [2, 1]);
  });

  test("the SDK with app A's secret and app B's id gets 401, and B's subscribers hear nothing", BOUNDED, async () => {
    const heard = record(await subscribed(client(B), "news"), "story");
    const forged = sdk(B, A.secret);
    await rejectsWith(forged.trigger("news", "story", { from: "a, as b" }), 401, "trigger");
    await rejectsWith(forged.get({ path: "/channels" }), 401, "GET /channels");
    await rejectsWith(forged.triggerBatch([{ channel: "news", name: "story", data: "x" }]), 401, "triggerBatch");
    // A channel authorization signed with A's secret does not open B's private channel either.
    const channel = client(B, { authorizer: forged }).subscribe("private-news");
    assert.equal((await once(channel, "pusher:subscription_error")).status, 401);
    await sleep(300);
    assert.deepEqual(heard, []);
  });

  test("an unknown key gets 4001 and a disabled app's key 4003; pusher-js gives up on both", BOUNDED, async () => {
    const unknown = client(app("nobody"));
    const disabled = client(OFF);
    const [unknownSeen, disabledSeen] = [watch(unknown), watch(disabled)];
    await Promise.all([refusedWith(unknown, unknownSeen, 4001), refusedWith(disabled, disabledSeen, 4003)]);
  });

  test("past an app's max_connections pusher-js gets 4004; the other apps' clients do not count", BOUNDED, async () => {
    await Promise.all([client(QUOTA), client(QUOTA)].map(connected));
    await connected(client(A)); // Another app's client is not counted against QUOTA's two.
    const third = client(QUOTA);
    const seen = watch(third);
    await refusedWith(third, seen, 4004);
    assert.equal(codeOf(seen.errors[0]), 4004);
    assert.match(seen.errors[0].error.data.message, /quota/i);
    // A client that leaves frees its place.
    openClients.shift().disconnect();
    await eventually(async () => {
      const next = client(QUOTA);
      const state = await Promise.race([once(next.connection, "connected", 3000).then(() => "connected"), once(next.connection, "error", 3000).then(() => "refused")]);
      if (state !== "connected") next.disconnect();
      return state === "connected";
    }, 8000, "a place in QUOTA's quota");
  });

  test("an Origin outside allowed_origins gets 4009; an allowed Origin, no Origin, and an app without a list connect", BOUNDED, async () => {
    const outside = client(WEB, { origin: "https://evil.test" });
    const seen = watch(outside);
    await refusedWith(outside, seen, 4009);
    assert.match(seen.errors[0].error.data.message, /evil\.test/);
    await connected(client(WEB, { origin: "https://chat.example.com" })); // *.example.com
    await connected(client(WEB, { origin: "https://app.test" })); // the whole origin
    const schemeDiffers = client(WEB, { origin: "http://app.test" });
    await refusedWith(schemeDiffers, watch(schemeDiffers), 4009);
    await connected(client(WEB)); // Not a browser: no Origin, not held to the list.
    await connected(client(A, { origin: "https://evil.test" })); // A allows any origin.
  });

  test("client events: pusher:error 4301 where enable_client_messages is off (B), delivered where on (A)", BOUNDED, async () => {
    // B: refused, and the listener on B's channel hears nothing.
    const [bSender, bListener] = [client(B), client(B)];
    const [bFrom, bTo] = await Promise.all([subscribed(bSender, "private-room"), subscribed(bListener, "private-room")]);
    const bHeard = record(bTo, "client-typing");
    const refused = once(bSender.connection, "error");
    assert.equal(bFrom.trigger("client-typing", { who: "b" }), true);
    const error = await refused;
    assert.equal(error.type, "PusherError");
    assert.equal(error.data.code, 4301, JSON.stringify(error));
    // A: delivered to the other subscriber (and not to B's channel of the same name).
    const [aSender, aListener] = [client(A), client(A)];
    const [aFrom, aTo] = await Promise.all([subscribed(aSender, "private-room"), subscribed(aListener, "private-room")]);
    const aHeard = record(aTo, "client-typing");
    const aErrors = watch(aSender).errors;
    assert.equal(aFrom.trigger("client-typing", { who: "a" }), true);
    await eventually(() => aHeard.length === 1, 3000, "A's client event");
    await sleep(300);
    assert.deepEqual(aHeard, [{ who: "a" }]);
    assert.deepEqual(bHeard, []);
    assert.deepEqual(aErrors, []);
    assert.equal(bSender.connection.state, "connected", "a refused client event does not close the connection");
  });

  test("REST limits are each app's: over B's batch size, channels at once or payload is 413; A takes the same calls", BOUNDED, async () => {
    const batch = (n) => Array.from({ length: n }, (_, i) => ({ channel: `batch-${i}`, name: "item", data: { i } }));
    await rejectsWith(sdk(B).triggerBatch(batch(3)), 413, "B: a batch of 3 (max_event_batch_size = 2)");
    await sdk(B).triggerBatch(batch(2));
    await sdk(A).triggerBatch(batch(3));

    const channels = ["one", "two", "three"];
    await rejectsWith(sdk(B).trigger(channels, "news", {}), 413, "B: 3 channels (max_event_channels_at_once = 2)");
    await sdk(B).trigger(channels.slice(0, 2), "news", {});
    await sdk(A).trigger(channels, "news", {});

    // The SDK sends JSON.stringify(data): {"blob":"..."} is 11 bytes of envelope around the blob.
    const blob = (bytes) => ({ blob: "x".repeat(bytes - 11) });
    await sdk(B).trigger("sizes", "fits", blob(1024));
    await rejectsWith(sdk(B).trigger("sizes", "big", blob(1025)), 413, "B: 1 KiB + 1 byte (max_event_payload_kb = 1)");
    await sdk(A).trigger("sizes", "fits", blob(10 * 1024));
    await rejectsWith(sdk(A).trigger("sizes", "big", blob(10 * 1024 + 1)), 413, "A: over the default 10 KiB");

    // What was refused was not delivered in part: B's subscriber of a refused batch's channel heard nothing.
    const heard = record(await subscribed(client(B), "batch-0"), "item");
    await rejectsWith(sdk(B).triggerBatch(batch(3)), 413, "B: a batch of 3 again");
    await sleep(300);
    assert.deepEqual(heard, []);
  });

  test("a disabled app's REST calls get 403", BOUNDED, async () => {
    await rejectsWith(sdk(OFF).trigger("news", "story", {}), 403, "trigger");
    await rejectsWith(sdk(OFF).triggerBatch([{ channel: "news", name: "story", data: "x" }]), 403, "triggerBatch");
    await rejectsWith(sdk(OFF).get({ path: "/channels" }), 403, "GET /channels");
  });
});

describe("SIGHUP reloads the apps file", () => {
  let flux, file;
  const sdk = (app) => newPusherServer(flux.port, app.secret, app);
  const client = (app) => clientOf(flux.port, app);
  /** A's client, connected before the reloads, with what it heard, its socket id and its state changes. */
  let kept;
  /** B's client, connected before B is disabled. */
  let disabled;
  /** How many times the log has said `line` so far. */
  const said = (line) => flux.log().split("\n").filter((l) => l.includes(line)).length;

  before(async () => {
    file = appsFile([table(A), table(B)].join("\n"));
    flux = await startFlux({ FLUX_APPS_FILE: file.path });
    const pusher = await connected(client(A));
    const states = [];
    pusher.connection.bind("state_change", ({ current }) => states.push(current));
    kept = { pusher, socketId: pusher.connection.socket_id, states, heard: record(await subscribed(pusher, "news"), "story") };
    disabled = await connected(client(B));
  }, BOUNDED);

  after(async () => {
    disconnectAll();
    await flux?.stop();
    file?.remove();
  }, BOUNDED);

  /** Triggers `data` with A's SDK and waits for A's kept client to hear it. */
  async function keptHears(data) {
    await sdk(A).trigger("news", "story", data);
    await eventually(() => kept.heard.some((d) => d.n === data.n), 5000, `A's event ${data.n}`);
  }

  test("an app added to the file works at once; a disabled app's client is closed with 4003 and stays closed", BOUNDED, async () => {
    await keptHears({ n: 1 });
    const early = client(C);
    await refusedWith(early, watch(early), 4001); // Not an app yet.
    const seen = watch(disabled);

    file.write([table(A), table(B, "enabled = false"), table(C)].join("\n"));
    flux.kill("SIGHUP");
    await eventually(() => said("SIGHUP: reloaded") === 1, 5000, "the reload in the log");
    await keptHears({ n: 2 });

    // Workers close a disabled app's connections at their next sweep, within a second.
    await refusedWith(disabled, seen, 4003);
    const again = client(B);
    await refusedWith(again, watch(again), 4003);
    await rejectsWith(sdk(B).trigger("news", "story", {}), 403, "B's REST call");

    const added = await connected(client(C));
    const heard = record(await subscribed(added, "news"), "story");
    await sdk(C).trigger("news", "story", { n: "c" });
    await eventually(() => heard.length === 1, 5000, "C's event");
    await keptHears({ n: 3 });
    assert.deepEqual(heard, [{ n: "c" }]);
    assert.ok(!kept.heard.some((d) => d.n === "c"), "C's news is not A's");
  });

  test("a bad file on SIGHUP is refused and logged; every app keeps working as it was", BOUNDED, async () => {
    const good = file.path;
    file.write([table(A), table(C), `[[apps]]`, `id = "app-d"`, `key = "key-a"`, `secret = "secret-d"`, ""].join("\n"));
    flux.kill("SIGHUP");
    const refusal = await eventually(() => flux.log().split("\n").find((l) => l.includes("SIGHUP: apps file")), 5000, "the refusal in the log");
    assert.ok(refusal.includes(good) && /line 13\b/.test(refusal) && refusal.includes('"key-a"') && refusal.includes("running apps are kept"), refusal);
    assert.equal(said("SIGHUP: reloaded"), 1, "nothing was reloaded");

    await keptHears({ n: 4 });
    const c = await connected(client(C)); // C, added by the good file, is still there.
    const heard = record(await subscribed(c, "news"), "story");
    await sdk(C).trigger("news", "story", { n: "c2" });
    await eventually(() => heard.length === 1, 5000, "C's event after the bad reload");
    const b = client(B); // B is still disabled: the bad file's lack of B changed nothing.
    await refusedWith(b, watch(b), 4003);
  });

  test("an app removed from the file is closed with 4003 and unknown after (4001); a re-enabled app takes clients again", BOUNDED, async () => {
    const c = await connected(client(C));
    const seen = watch(c);
    file.write([table(A), table(B)].join("\n"));
    flux.kill("SIGHUP");
    await eventually(() => said("SIGHUP: reloaded") === 2, 5000, "the second reload in the log");
    await refusedWith(c, seen, 4003);
    const later = client(C);
    await refusedWith(later, watch(later), 4001);
    await connected(client(B));
    await keptHears({ n: 5 });
  });

  test("a file that cannot be read on SIGHUP is logged, and the running apps are kept", BOUNDED, async () => {
    const moved = `${file.path}.away`;
    fs.renameSync(file.path, moved);
    try {
      flux.kill("SIGHUP");
      await eventually(() => said("cannot read the apps file") === 1, 5000, "the refusal in the log");
      assert.equal(said("SIGHUP: reloaded"), 2, "nothing was reloaded");
      await connected(client(B));
      await keptHears({ n: 6 });
    } finally {
      fs.renameSync(moved, file.path);
    }
  });

  test("a changed setting applies to a connected client's next request", BOUNDED, async () => {
    const [sender, listener] = [client(B), client(B)];
    const [from, to] = await Promise.all([subscribed(sender, "private-room"), subscribed(listener, "private-room")]);
    const heard = record(to, "client-typing");
    const refused = once(sender.connection, "error");
    from.trigger("client-typing", { n: 1 });
    assert.equal((await refused).data.code, 4301, "client events are off for B");
    file.write([table(A), table(B, "enable_client_messages = true")].join("\n"));
    flux.kill("SIGHUP");
    await eventually(() => said("SIGHUP: reloaded") === 3, 5000, "the third reload in the log");
    from.trigger("client-typing", { n: 2 });
    await eventually(() => heard.length === 1, 3000, "B's client event once allowed");
    assert.deepEqual(heard, [{ n: 2 }]);
    await keptHears({ n: 7 });
  });

  test("A's client kept its connection through every reload and heard every event, in order", BOUNDED, async () => {
    await keptHears({ n: 8 });
    assert.equal(kept.pusher.connection.state, "connected");
    assert.equal(kept.pusher.connection.socket_id, kept.socketId, "the same connection");
    assert.deepEqual(kept.states, [], "no state change since it connected");
    assert.deepEqual(kept.heard.map((d) => d.n), [1, 2, 3, 4, 5, 6, 7, 8]);
  });
});

describe("a bad apps file at start", () => {
  let file;
  afterEach(() => file?.remove(), BOUNDED);

  /** Starts flux on `text` and returns its log, once it has exited non-zero. */
  async function refused(text) {
    file = appsFile(text);
    const { code, signal, error, log } = await fluxExit({ FLUX_APPS_FILE: file.path });
    assert.equal(error, undefined, `flux did not run: ${error}`);
    assert.notEqual(code, 0, `flux exited 0 on a bad apps file:\n${log}`);
    assert.equal(signal, null, log);
    assert.doesNotMatch(log, /panicked/, "flux panicked");
    return log.split("\n").find((line) => line.includes(file.path)) ?? assert.fail(`no line names ${file.path}:\n${log}`);
  }

  test("a duplicate key: the line of the second use, and the first", BOUNDED, async () => {
    const line = await refused([table(A), `[[apps]]`, `id = "app-b"`, `key = "key-a"`, `secret = "secret-b"`].join("\n"));
    assert.match(line, /line 8: app key "key-a" is already used by the app on line 1/);
  });

  test("an unknown field: its app's line and the field's name", BOUNDED, async () => {
    const line = await refused([table(A), table(B, "max_conections = 5")].join("\n"));
    assert.match(line, /line \d+: .*max_conections/);
    assert.match(line, /line (6|10):/, "the app's [[apps]] line (or, better, the field's)");
  });

  test("a wrong type: its app's line and what was expected", BOUNDED, async () => {
    const line = await refused([table(A), table(B, 'max_connections = "many"')].join("\n"));
    assert.match(line, /line (6|10): .*(invalid type|expected)/);
  });

  test("a missing secret: the app's line and the field", BOUNDED, async () => {
    const line = await refused([table(A), `[[apps]]`, `id = "app-b"`, `key = "key-b"`, ""].join("\n"));
    assert.match(line, /line 6: .*secret/);
  });
});
