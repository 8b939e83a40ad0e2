// Flux against the real clients: pusher-js 8, the official `pusher` server SDK, and `ws`.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import PusherClient from "pusher-js";
import PusherServer from "pusher";
import WebSocket from "ws";
import { APP, eventually, once, startFlux } from "./flux.mjs";

let flux;
const clients = [];

function client(options = {}) {
  const pusher = new PusherClient(options.key ?? APP.key, {
    wsHost: "127.0.0.1",
    wsPort: flux.port,
    forceTLS: false,
    enabledTransports: ["ws"],
    cluster: "mt1",
    ...options,
  });
  clients.push(pusher);
  return pusher;
}

function server(secret = APP.secret) {
  return new PusherServer({ ...APP, secret, host: "127.0.0.1", port: String(flux.port), useTLS: false });
}

async function connected(pusher) {
  if (pusher.connection.state !== "connected") await once(pusher.connection, "connected");
  return pusher;
}

async function subscribed(pusher, name) {
  const channel = pusher.subscribe(name);
  await once(channel, "pusher:subscription_succeeded");
  return channel;
}

/** Collects the `event` events of `channel` into an array. */
function collect(channel, event) {
  const got = [];
  channel.bind(event, (data) => got.push(data));
  return got;
}

/** A raw WebSocket that queues every parsed message for `next()`. */
function raw(path) {
  const ws = new WebSocket(`ws://127.0.0.1:${flux.port}${path}`);
  const queue = [];
  const waiters = [];
  ws.on("message", (data) => {
    const message = JSON.parse(data.toString());
    const waiter = waiters.shift();
    waiter ? waiter(message) : queue.push(message);
  });
  ws.next = () => (queue.length ? Promise.resolve(queue.shift()) : new Promise((resolve) => waiters.push(resolve)));
  ws.closed = new Promise((resolve) => ws.on("close", (code) => resolve(code)));
  return ws;
}

before(async () => {
  flux = await startFlux();
});

after(async () => {
  clients.forEach((c) => c.disconnect());
  assert.equal(await flux.stop(), 0, "flux exits 0 on SIGTERM");
  assert.doesNotMatch(flux.log(), /panicked/);
});

describe("pusher-js and the pusher SDK", () => {
  test("a client connects, subscribes and receives a triggered event intact", async () => {
    const pusher = await connected(client());
    assert.match(pusher.connection.socket_id, /^\d+\.\d+$/);
    const channel = await subscribed(pusher, "orders");
    const received = once(channel, "created");
    await server().trigger("orders", "created", { id: 42, items: ["a", "b"], note: "ünïcödé" });
    assert.deepEqual(await received, { id: 42, items: ["a", "b"], note: "ünïcödé" });
  });

  test("one trigger reaches several channels, and socket_id excludes the publisher", async () => {
    const [alice, bob] = await Promise.all([connected(client()), connected(client())]);
    const aliceGot = collect(await subscribed(alice, "room-a"), "msg");
    const bobGot = collect(await subscribed(bob, "room-b"), "msg");
    await subscribed(bob, "room-a").then((c) => collect(c, "msg")).then((bobOnA) => (bob.onA = bobOnA));

    await server().trigger(["room-a", "room-b"], "msg", { n: 1 }, { socket_id: alice.connection.socket_id });
    await server().trigger(["room-a", "room-b"], "msg", { n: 2 });
    await eventually(() => aliceGot.length === 1 && bobGot.length === 2 && bob.onA.length === 2);
    assert.deepEqual(aliceGot, [{ n: 2 }], "alice was excluded from the first event");
    assert.deepEqual(bobGot, [{ n: 1 }, { n: 2 }]);
  });

  test("triggerBatch delivers every event in order", async () => {
    const pusher = await connected(client());
    const got = collect(await subscribed(pusher, "batch"), "item");
    const batch = Array.from({ length: 10 }, (_, i) => ({ channel: "batch", name: "item", data: { i } }));
    await server().triggerBatch(batch);
    await eventually(() => got.length === 10);
    assert.deepEqual(got.map((d) => d.i), [...Array(10).keys()]);
  });

  test("the channels API counts subscriptions", async () => {
    const pushers = await Promise.all([1, 2, 3].map(() => connected(client())));
    await Promise.all(pushers.map((p) => subscribed(p, "stats-room")));
    const body = await eventually(async () => {
      const response = await server().get({ path: "/channels", params: { filter_by_prefix: "stats-", info: "subscription_count" } });
      const json = await response.json();
      return json.channels?.["stats-room"]?.subscription_count === 3 && json;
    });
    assert.deepEqual(body, { channels: { "stats-room": { subscription_count: 3 } } });
    const one = await (await server().get({ path: "/channels/stats-room", params: { info: "subscription_count" } })).json();
    assert.deepEqual(one, { occupied: true, subscription_count: 3 });
  });

  test("a wrong secret is refused with 401 and an oversized event with 413", async () => {
    await assert.rejects(server("wrong-secret").trigger("orders", "created", {}), (e) => e.status === 401 && /signature/.test(e.body));
    await assert.rejects(server().trigger("orders", "big", { blob: "x".repeat(11 * 1024) }), (e) => e.status === 413);
  });

  test("an unknown app key gets error 4001", async () => {
    const pusher = client({ key: "not-a-key" });
    const error = await once(pusher.connection, "error");
    assert.equal(error.error.data.code, 4001);
  });
});

describe("raw WebSocket clients (ws)", () => {
  test("connection_established carries socket_id and activity_timeout; ping gets pong", async () => {
    const ws = raw("/app/app-key?protocol=7&client=js&version=8.4.0");
    const established = await ws.next();
    assert.equal(established.event, "pusher:connection_established");
    const data = JSON.parse(established.data);
    assert.match(data.socket_id, /^\d+\.\d+$/);
    assert.equal(data.activity_timeout, 120);
    ws.send(JSON.stringify({ event: "pusher:ping", data: {} }));
    assert.equal((await ws.next()).event, "pusher:pong");
    ws.close();
  });

  test("an unsupported protocol version gets 4007 and a close", async () => {
    const ws = raw("/app/app-key?protocol=3");
    const error = await ws.next();
    assert.equal(error.event, "pusher:error");
    assert.equal(error.data.code, 4007);
    assert.equal(await ws.closed, 4007);
  });

  test("client events on public channels and junk get pusher:error, and the connection lives on", async () => {
    const ws = raw("/app/app-key?protocol=7");
    await ws.next();
    ws.send(JSON.stringify({ event: "pusher:subscribe", data: { channel: "public" } }));
    assert.equal((await ws.next()).event, "pusher_internal:subscription_succeeded");
    ws.send(JSON.stringify({ event: "client-typing", channel: "public", data: {} }));
    assert.equal((await ws.next()).event, "pusher:error");
    ws.send("this is not JSON");
    assert.equal((await ws.next()).event, "pusher:error");
    ws.send(JSON.stringify({ event: "pusher:ping", data: {} }));
    assert.equal((await ws.next()).event, "pusher:pong");
    ws.close();
  });
});

describe("shutdown", () => {
  test("SIGTERM closes every client with 4200 and exits 0", async () => {
    const own = await startFlux();
    const sockets = [1, 2, 3].map(() => new WebSocket(`ws://127.0.0.1:${own.port}/app/app-key?protocol=7`));
    await Promise.all(sockets.map((ws) => new Promise((resolve) => ws.once("message", resolve))));
    const codes = Promise.all(sockets.map((ws) => new Promise((resolve) => ws.on("close", resolve))));
    assert.equal(await own.stop(), 0);
    assert.deepEqual(await codes, [4200, 4200, 4200]);
  });
});
