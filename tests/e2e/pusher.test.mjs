// Flux against real third-party clients: pusher-js 8 (the Node build), the official `pusher`
// server SDK, and raw `ws` sockets for what pusher-js hides (frames, close codes).
import { isDeepStrictEqual } from "node:util";
import { after, afterEach, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import http from "node:http";
import net from "node:net";
import {
  ACTIVITY_TIMEOUT,
  APP,
  connected,
  eventually,
  newPusherClient,
  newPusherServer,
  once,
  record,
  sleep,
  startFlux,
  subscribed,
} from "./flux.mjs";

/** Every test and hook is bounded; a hang fails its test instead of stalling the run. */
const BOUNDED = { timeout: 15_000 };

let flux;
/** Clients a test opened, closed after it so occupancy never leaks into the next test. */
const openClients = [];

before(async () => {
  flux = await startFlux();
}, BOUNDED);

/** Closes the clients a test opened. */
function disconnectAll() {
  for (const client of openClients.splice(0)) client.disconnect();
}

afterEach(disconnectAll, BOUNDED);

after(async () => {
  await flux?.stop(); // Absent if it failed to start: that failure is already reported.
}, BOUNDED);

/**
 * A pusher-js client of the shared gateway (or of the one on `port`), on plain WebSocket only.
 * Private channels are authorized, and users signed in, by the official server SDK (`authorizer`,
 * whose secret a test may make wrong), as an app's auth endpoint would do.
 */
function pusherClient(key = APP.key, { authorizer = pusherServer(), user = { id: "user-1" }, port = flux.port } = {}) {
  const pusher = newPusherClient(port, { key, authorizer, user });
  openClients.push(pusher);
  return pusher;
}

/** The official server SDK, pointed at the shared gateway. */
function pusherServer(secret = APP.secret) {
  return newPusherServer(flux.port, secret);
}

/** GETs a REST resource with the SDK and parses its JSON body. */
async function getJson(path, params = {}) {
  const response = await pusherServer().get({ path, params });
  return response.json();
}

/**
 * Polls a REST resource until it equals `expected`. Occupancy reaches the other worker through its
 * inbox, so the first answer may be a few milliseconds behind; a wrong final answer shows its diff.
 */
async function settlesTo(path, params, expected) {
  const deadline = Date.now() + 3000;
  let last = await getJson(path, params);
  while (!isDeepStrictEqual(last, expected) && Date.now() < deadline) {
    await sleep(20);
    last = await getJson(path, params);
  }
  assert.deepEqual(last, expected, `GET ${path} ${JSON.stringify(params)}`);
}

/** A raw WebSocket to a gateway: messages are parsed and queued for `next()`. */
class RawClient {
  constructor(port, path) {
    this.queue = [];
    this.waiters = [];
    this.ws = new WebSocket(`ws://127.0.0.1:${port}${path}`);
    this.ws.on("message", (data) => {
      const message = JSON.parse(data.toString());
      const waiter = this.waiters.shift();
      if (waiter) waiter(message);
      else this.queue.push(message);
    });
    // Without a listener, a socket error would be thrown from the emitter and end the run.
    this.ws.on("error", (error) => (this.error = error));
    /** Resolves with `{ code, reason }` when the server closes the connection. */
    this.closed = new Promise((resolve) => this.ws.on("close", (code, reason) => resolve({ code, reason: reason.toString() })));
    openClients.push(this);
  }

  /** The next message from the server, or a rejection after `ms`. */
  next(ms = 5000) {
    if (this.queue.length) return Promise.resolve(this.queue.shift());
    return new Promise((resolve, reject) => {
      const waiter = (message) => {
        clearTimeout(timer);
        resolve(message);
      };
      const timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(waiter), 1);
        reject(new Error(`no message within ${ms} ms${this.error ? ` (${this.error.message})` : ""}`));
      }, ms);
      this.waiters.push(waiter);
    });
  }

  send(message) {
    this.ws.send(typeof message === "string" ? message : JSON.stringify(message));
  }

  disconnect() {
    this.ws.terminate();
  }
}

/** A raw client past `pusher:connection_established`, with that message's parsed data. */
async function established(port = flux.port) {
  const client = new RawClient(port, `/app/${APP.key}?protocol=7&client=js&version=8.6.0`);
  const message = await client.next();
  assert.equal(message.event, "pusher:connection_established");
  client.established = JSON.parse(message.data);
  return client;
}

describe("pusher-js and the pusher server SDK", () => {
  test("a client connects, subscribes and receives a triggered event with its data intact", BOUNDED, async () => {
    const pusher = await connected(pusherClient());
    assert.match(pusher.connection.socket_id, /^\d+\.\d+$/);
    const channel = await subscribed(pusher, "orders");
    const data = { id: 42, items: ["a", "b"], nested: { ok: true, none: null }, text: 'ünïcödé "quoted" \\ \n', pi: 3.14 };
    const received = once(channel, "created");
    await pusherServer().trigger("orders", "created", data);
    assert.deepEqual(await received, data);
  });

  test("1,000 channels subscribed before connecting are all confirmed, and each receives events", BOUNDED, async () => {
    // pusher-js sends every pending subscription at once on connect (and on every reconnect):
    // one read brings the server far more requests than a connection's 256-frame ring holds.
    const pusher = pusherClient();
    const names = Array.from({ length: 1000 }, (_, i) => `many-${i}`);
    let confirmed = 0;
    const channels = names.map((name) => {
      const channel = pusher.subscribe(name);
      channel.bind("pusher:subscription_succeeded", () => confirmed++);
      return channel;
    });
    await eventually(() => confirmed === names.length, 8000, "1,000 subscription_succeeded").catch((error) => {
      throw new Error(`${error.message}: ${confirmed} arrived`);
    });
    assert.ok(channels.every((channel) => channel.subscribed), "pusher-js marks every channel subscribed");
    const last = names[names.length - 1];
    const received = once(channels[channels.length - 1], "after-burst");
    await pusherServer().trigger(last, "after-burst", { ok: true });
    assert.deepEqual(await received, { ok: true });
  });

  test("one trigger reaches every channel it names", BOUNDED, async () => {
    const [alice, bob] = await Promise.all([connected(pusherClient()), connected(pusherClient())]);
    const names = ["multi-a", "multi-b", "multi-c"];
    const received = [
      record(await subscribed(alice, "multi-a"), "news"),
      record(await subscribed(alice, "multi-b"), "news"),
      record(await subscribed(bob, "multi-c"), "news"),
    ];
    await pusherServer().trigger(names, "news", { headline: "all three" });
    await eventually(() => received.every((r) => r.length === 1), 5000, "the event on every channel");
    assert.deepEqual(received, [[{ headline: "all three" }], [{ headline: "all three" }], [{ headline: "all three" }]]);
  });

  test("triggerBatch delivers each event to its channel, in order", BOUNDED, async () => {
    const pusher = await connected(pusherClient());
    const even = record(await subscribed(pusher, "batch-even"), "item");
    const odd = record(await subscribed(pusher, "batch-odd"), "item");
    // Ten events: the most one batch may hold.
    const batch = Array.from({ length: 10 }, (_, i) => ({ channel: i % 2 ? "batch-odd" : "batch-even", name: "item", data: { i } }));
    await pusherServer().triggerBatch(batch);
    await eventually(() => even.length + odd.length === 10, 5000, "ten batched events");
    assert.deepEqual(even.map((d) => d.i), [0, 2, 4, 6, 8]);
    assert.deepEqual(odd.map((d) => d.i), [1, 3, 5, 7, 9]);
  });

  test("socket_id excludes that connection, and only that one", BOUNDED, async () => {
    const [alice, bob] = await Promise.all([connected(pusherClient()), connected(pusherClient())]);
    const aliceGot = record(await subscribed(alice, "excluding"), "said");
    const bobGot = record(await subscribed(bob, "excluding"), "said");
    await pusherServer().trigger("excluding", "said", { n: 1 }, { socket_id: alice.connection.socket_id });
    await pusherServer().trigger("excluding", "said", { n: 2 });
    // Alice's connection gets a channel's events in publish order (each worker has one FIFO
    // inbox), so once she has the second event she would already have had the first.
    await eventually(() => aliceGot.length >= 1 && bobGot.length === 2, 5000, "both events");
    assert.deepEqual(aliceGot, [{ n: 2 }], "the excluded client received only the event that did not exclude it");
    assert.deepEqual(bobGot, [{ n: 1 }, { n: 2 }]);
  });

  test("the channels API reports subscription counts across workers, and their decrease", BOUNDED, async () => {
    // Connections are spread over the two workers, so the counts below add up both.
    const [a, b, c, other] = await Promise.all([1, 2, 3, 4].map(() => connected(pusherClient())));
    await Promise.all([a, b, c].map((p) => subscribed(p, "stats-room")));
    await subscribed(a, "stats-lobby");
    await subscribed(other, "elsewhere");

    const params = { filter_by_prefix: "stats-", info: "subscription_count" };
    await settlesTo("/channels", params, {
      channels: { "stats-lobby": { subscription_count: 1 }, "stats-room": { subscription_count: 3 } },
    });
    await settlesTo("/channels/stats-room", { info: "subscription_count" }, { occupied: true, subscription_count: 3 });

    a.unsubscribe("stats-room");
    b.disconnect();
    await settlesTo("/channels/stats-room", { info: "subscription_count" }, { occupied: true, subscription_count: 1 });
    a.disconnect();
    await settlesTo("/channels", params, { channels: { "stats-room": { subscription_count: 1 } } });
    await settlesTo("/channels/stats-lobby", {}, { occupied: false });
  });

  test("a request signed with the wrong secret is refused with 401", BOUNDED, async () => {
    await assert.rejects(pusherServer("wrong-secret").trigger("orders", "created", {}), (error) => {
      assert.equal(error.status, 401);
      assert.match(error.body, /auth_signature/);
      return true;
    });
  });

  test("event data over 10 KiB is refused with 413, and 10 KiB is accepted", BOUNDED, async () => {
    // The SDK sends JSON.stringify(data): {"blob":"..."} is 11 bytes of envelope around the blob.
    const limit = 10 * 1024;
    await pusherServer().trigger("sizes", "fits", { blob: "x".repeat(limit - 11) });
    await assert.rejects(pusherServer().trigger("sizes", "big", { blob: "x".repeat(limit - 10) }), (error) => {
      assert.equal(error.status, 413);
      return true;
    });
  });

  test("an unknown app key gets error 4001 and pusher-js gives up", BOUNDED, async () => {
    const pusher = pusherClient("not-a-key");
    // pusher-js wraps a pusher:error that arrives before connection_established in a WebSocketError.
    const { type, error } = await once(pusher.connection, "error");
    assert.equal(type, "WebSocketError");
    assert.deepEqual(error.data, { code: 4001, message: "App key not-a-key does not exist" });
    // 4000-4099 means "do not reconnect as is": pusher-js disconnects instead of retrying.
    await eventually(() => pusher.connection.state === "disconnected", 5000, "pusher-js to disconnect");
  });
});

describe("private channels, client events and sign-in (pusher-js authorized by the pusher SDK)", () => {
  test("a private channel subscribes with authorizeChannel's signature and receives events", BOUNDED, async () => {
    const channel = await subscribed(pusherClient(), "private-orders");
    const received = record(channel, "paid");
    await pusherServer().trigger("private-orders", "paid", { order: 7 });
    await eventually(() => received.length === 1, 3000, "the event on the private channel");
    assert.deepEqual(received, [{ order: 7 }]);
  });

  test("a signature made with the wrong secret gets subscription_error 401, reported by pusher-js", BOUNDED, async () => {
    const channel = pusherClient(APP.key, { authorizer: pusherServer("not-the-secret") }).subscribe("private-orders");
    const error = await once(channel, "pusher:subscription_error");
    assert.equal(error.status, 401);
    assert.equal(error.type, "AuthError");
    assert.equal(channel.subscribed, false);
  });

  test("client events reach the other subscribers, never the sender", BOUNDED, async () => {
    const [alice, bob, carol] = [pusherClient(), pusherClient(), pusherClient()];
    const [a, b, c] = await Promise.all([alice, bob, carol].map((client) => subscribed(client, "private-room")));
    const [toAlice, toBob, toCarol] = [a, b, c].map((channel) => record(channel, "client-typing"));
    assert.equal(a.trigger("client-typing", { who: "alice" }), true);
    await eventually(() => toBob.length === 1 && toCarol.length === 1, 3000, "bob and carol to see alice typing");
    assert.deepEqual(toBob, [{ who: "alice" }]);
    assert.deepEqual(toCarol, [{ who: "alice" }]);
    await sleep(200);
    assert.deepEqual(toAlice, [], "the sender must not get its own client event");
  });

  test("client events over 10 a second get pusher:error 4301 and are not delivered", BOUNDED, async () => {
    const [sender, listener] = [pusherClient(), pusherClient()];
    const [from, to] = await Promise.all([sender, listener].map((client) => subscribed(client, "private-flood")));
    const errors = [];
    sender.connection.bind("error", (error) => errors.push(error));
    const received = record(to, "client-tick");
    for (let i = 0; i < 15; i++) from.trigger("client-tick", { i });
    await eventually(() => errors.length >= 4, 3000, "pusher:error for the events over the limit");
    await sleep(200);
    assert.ok(errors.every((error) => error.data?.code === 4301), JSON.stringify(errors));
    assert.ok(received.length >= 10 && received.length <= 11, `delivered ${received.length} of 15`);
    assert.equal(received.length + errors.length, 15);
  });

  test("signin opens the user's channel; terminate_connections closes that user's connections with 4009", BOUNDED, async () => {
    const signedIn = pusherClient(APP.key, { user: { id: "user-9", name: "Nine" } });
    const bystander = pusherClient(APP.key, { user: { id: "user-10" } });
    await Promise.all([signedIn, bystander].map(connected));
    signedIn.signin();
    bystander.signin();
    await eventually(() => signedIn.user.serverToUserChannel?.subscribed && bystander.user.serverToUserChannel?.subscribed, 3000, "both users' channels");
    assert.equal(signedIn.user.user_data.name, "Nine");
    // A raw connection signed in as the same user, to read the close code.
    const raw = await established();
    const auth = pusherServer().authenticateUser(raw.established.socket_id, { id: "user-9" });
    raw.send({ event: "pusher:signin", data: auth });
    assert.equal((await raw.next()).event, "pusher:signin_success");
    await pusherServer().terminateUserConnections("user-9");
    assert.equal((await raw.closed).code, 4009);
    await eventually(() => signedIn.connection.state !== "connected", 3000, "pusher-js to be disconnected");
    assert.equal(bystander.connection.state, "connected");
  });

  test("a forged signin closes the connection with 4009", BOUNDED, async () => {
    const raw = await established();
    const forged = pusherServer("not-the-secret").authenticateUser(raw.established.socket_id, { id: "mallory" });
    raw.send({ event: "pusher:signin", data: forged });
    assert.equal((await raw.closed).code, 4009);
  });
});

describe("presence channels (pusher-js authorized by the pusher SDK)", () => {
  /** A presence subscription's members as pusher-js holds them, sorted by id. */
  const ids = (channel) => Object.keys(channel.members.members).sort();

  test("members: one user on two connections is one member, added with the first and removed with the last", BOUNDED, async () => {
    const ann = pusherClient(APP.key, { user: { id: "ann", name: "Ann" } });
    const annRoom = await subscribed(ann, "presence-guild");
    assert.deepEqual(ids(annRoom), ["ann"]);
    assert.equal(annRoom.members.me.info.name, "Ann");
    const added = record(annRoom, "pusher:member_added");
    const removed = record(annRoom, "pusher:member_removed");

    const bob1 = pusherClient(APP.key, { user: { id: "bob", name: "Bob" } });
    const bobRoom1 = await subscribed(bob1, "presence-guild");
    // Ann is in bob's list, or, while her own member_added still waits out the coalescing
    // window, announced to him with everyone else: never both.
    const listed = ids(bobRoom1).includes("ann");
    const bobHeard = record(bobRoom1, "pusher:member_added");
    await eventually(() => isDeepStrictEqual(ids(bobRoom1), ["ann", "bob"]), 3000, "ann among bob's members");
    await sleep(400);
    assert.deepEqual(bobHeard.map((member) => member.id), listed ? [] : ["ann"], "ann listed or announced, never both");
    await eventually(() => added.length === 1, 3000, "member_added for bob");
    assert.deepEqual(added, [{ id: "bob", info: { name: "Bob" } }]);

    const bob2 = pusherClient(APP.key, { user: { id: "bob", name: "Bob" } });
    const bobRoom2 = await subscribed(bob2, "presence-guild");
    assert.equal(bobRoom2.members.count, 2);
    await settlesTo("/channels/presence-guild/users", {}, { users: [{ id: "ann" }, { id: "bob" }] });
    await settlesTo("/channels/presence-guild", { info: "user_count" }, { occupied: true, user_count: 2 });

    bob1.disconnect();
    await sleep(500); // More than the coalescing window: bob is still here on his second connection.
    assert.deepEqual(removed, []);
    bob2.disconnect();
    await eventually(() => removed.length === 1, 3000, "member_removed for bob");
    assert.equal(removed[0].id, "bob");
    assert.equal(added.length, 1, "no second member_added for bob's second connection");
    await settlesTo("/channels/presence-guild/users", {}, { users: [{ id: "ann" }] });
  });

  test("a reconnect inside the coalescing window announces nothing", BOUNDED, async () => {
    const watcher = await subscribed(pusherClient(APP.key, { user: { id: "watcher" } }), "presence-flap");
    const changes = [];
    watcher.bind("pusher:member_added", (m) => changes.push(["added", m.id]));
    watcher.bind("pusher:member_removed", (m) => changes.push(["removed", m.id]));
    const first = pusherClient(APP.key, { user: { id: "flapper" } });
    await subscribed(first, "presence-flap");
    await eventually(() => changes.length === 1, 3000, "flapper's member_added");
    // Drop and come back at once, as a client on a flaky network does.
    first.disconnect();
    await subscribed(pusherClient(APP.key, { user: { id: "flapper" } }), "presence-flap");
    await sleep(600);
    assert.deepEqual(changes, [["added", "flapper"]]);
  });

  test("client events on a presence channel carry the sender's user_id", BOUNDED, async () => {
    const [sender, listener] = [pusherClient(APP.key, { user: { id: "speaker" } }), pusherClient(APP.key, { user: { id: "audience" } })];
    const [from, to] = await Promise.all([sender, listener].map((client) => subscribed(client, "presence-stage")));
    const heard = [];
    to.bind("client-line", (data, metadata) => heard.push([data, metadata?.user_id]));
    from.trigger("client-line", { text: "hello" });
    await eventually(() => heard.length === 1, 3000, "the client event");
    assert.deepEqual(heard, [[{ text: "hello" }, "speaker"]]);
  });

  test("joins beyond FLUX_PRESENCE_MAX_MEMBERS get subscription_error 403", BOUNDED, async () => {
    const own = await startFlux({ FLUX_PRESENCE_MAX_MEMBERS: "2" });
    const client = (id) => pusherClient(APP.key, { user: { id }, port: own.port });
    await subscribed(client("one"), "presence-small");
    await subscribed(client("two"), "presence-small");
    const third = client("three").subscribe("presence-small");
    const error = await once(third, "pusher:subscription_error");
    assert.equal(error.status, 403);
    // A second connection of a member is still welcome.
    await subscribed(client("one"), "presence-small");
    for (const c of openClients.splice(0)) c.disconnect();
    await own.stop();
  });
});

/**
 * A webhook endpoint on a free loopback port that checks every POST with the official SDK's
 * webhook validation: `received` holds the valid events in arrival order, `invalid()` counts the
 * rest. `url` is for FLUX_WEBHOOK_URL; `close()` stops it.
 */
async function webhookReceiver() {
  const received = [];
  let invalid = 0;
  const server = http.createServer((request, response) => {
    let body = "";
    request.on("data", (chunk) => (body += chunk));
    request.on("end", () => {
      const webhook = pusherServer().webhook({ headers: request.headers, rawBody: body });
      if (webhook.isValid()) received.push(...webhook.getEvents());
      else invalid++;
      response.end("{}");
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { received, invalid: () => invalid, url: `http://127.0.0.1:${server.address().port}/hooks`, close: () => server.close() };
}

describe("webhooks", () => {
  test("occupied, member_added, client_event, member_removed and vacated are posted, signed as Pusher signs them", BOUNDED, async () => {
    const receiver = await webhookReceiver();
    const received = receiver.received;
    const own = await startFlux({ FLUX_WEBHOOK_URL: receiver.url, FLUX_WEBHOOK_BATCH_MS: "20" });
    try {
      const client = (id) => pusherClient(APP.key, { user: { id }, port: own.port });
      const [ann, bob] = [client("ann"), client("bob")];
      const annRoom = await subscribed(ann, "presence-hooks");
      await subscribed(bob, "presence-hooks");
      annRoom.trigger("client-wave", { hi: 1 });
      await sleep(300); // Past the presence coalescing window.
      bob.disconnect();
      ann.disconnect();
      const names = () => received.map((event) => `${event.name}${event.user_id ? ":" + event.user_id : ""}`);
      const all = ["channel_vacated", "member_removed:ann", "member_removed:bob"];
      await eventually(() => all.every((name) => names().includes(name)), 5000, "the leaves and channel_vacated");
      assert.equal(receiver.invalid(), 0, "every POST must carry a valid X-Pusher-Signature");
      // Presence changes wait out the coalescing window; channel_vacated waits for the last
      // member_removed, as on Pusher.
      assert.equal(names()[0], "channel_occupied");
      assert.equal(names().at(-1), "channel_vacated");
      assert.equal(names().filter((name) => name === "channel_vacated").length, 1);
      for (const expected of ["member_added:ann", "member_added:bob", "client_event:ann", "member_removed:ann", "member_removed:bob"]) {
        assert.equal(names().filter((name) => name === expected).length, 1, `${expected} once in ${JSON.stringify(names())}`);
      }
      const clientEvent = received.find((event) => event.name === "client_event");
      assert.equal(clientEvent.event, "client-wave");
      assert.equal(clientEvent.channel, "presence-hooks");
      assert.deepEqual(JSON.parse(clientEvent.data), { hi: 1 });
    } finally {
      await own.stop();
      receiver.close();
    }
  });
});

describe("cache channels", () => {
  /** Subscribes `pusher` to `name` and resolves with the channel and every event it got, in order, once `last` has come. */
  async function subscribedUntil(pusher, name, last) {
    const channel = pusher.subscribe(name);
    const events = [];
    channel.bind_global((event, data) => events.push({ event, data }));
    await once(channel, last);
    return { channel, events };
  }

  test("an event triggered with the pusher SDK reaches a later subscriber right after subscription_succeeded", BOUNDED, async () => {
    await pusherServer().trigger("cache-e2e-price", "price", { usd: 1 });
    await pusherServer().trigger("cache-e2e-price", "price", { usd: 2 });
    const { channel, events } = await subscribedUntil(await connected(pusherClient()), "cache-e2e-price", "price");
    assert.deepEqual(
      events.map(({ event }) => event),
      ["pusher:subscription_succeeded", "price"],
      "the last event, and only it, right after the confirmation",
    );
    assert.deepEqual(events[1].data, { usd: 2 });
    const live = once(channel, "price");
    await pusherServer().trigger("cache-e2e-price", "price", { usd: 3 });
    assert.deepEqual(await live, { usd: 3 }, "live events follow");
  });

  test("with nothing kept, pusher-js's pusher:cache_miss binding fires and a cache_miss webhook arrives", BOUNDED, async () => {
    const receiver = await webhookReceiver();
    const own = await startFlux({ FLUX_WEBHOOK_URL: receiver.url, FLUX_WEBHOOK_BATCH_MS: "20" });
    try {
      const client = await connected(pusherClient(APP.key, { port: own.port }));
      const { events } = await subscribedUntil(client, "private-cache-e2e-empty", "pusher:cache_miss");
      assert.deepEqual(events.map(({ event }) => event), ["pusher:subscription_succeeded", "pusher:cache_miss"]);
      await eventually(() => receiver.received.some((event) => event.name === "cache_miss"), 5000, "the cache_miss webhook");
      const misses = receiver.received.filter((event) => event.name === "cache_miss");
      assert.deepEqual(misses, [{ name: "cache_miss", channel: "private-cache-e2e-empty" }]);
      assert.equal(receiver.invalid(), 0, "every POST must carry a valid X-Pusher-Signature");
    } finally {
      // Before the gateway goes: a pusher-js client that sees it go keeps trying to reconnect.
      disconnectAll();
      await own.stop();
      receiver.close();
    }
  });
});

describe("subscription counts (FLUX_SUBSCRIPTION_COUNT_EVENTS)", () => {
  /**
   * Subscribes `pusher` to `name`, recording its pusher:subscription_count events from before
   * the subscription (the first comes right behind the confirmation), and resolves with them.
   */
  async function countsOf(pusher, name) {
    const channel = pusher.subscribe(name);
    const counts = record(channel, "pusher:subscription_count");
    await once(channel, "pusher:subscription_succeeded");
    return counts;
  }
  const last = (counts) => counts.at(-1)?.subscription_count;

  test("public and private subscribers hear the count as pusher:subscription_count; presence members do not", BOUNDED, async () => {
    const own = await startFlux({ FLUX_SUBSCRIPTION_COUNT_EVENTS: "true" });
    try {
      const client = (id = "user-1") => connected(pusherClient(APP.key, { port: own.port, user: { id } }));
      const watcher = await client();
      const counts = await countsOf(watcher, "counted");
      await eventually(() => last(counts) === 1, 5000, "the watcher's own count");
      for (let i = 0; i < 4; i++) await subscribed(await client(), "counted");
      await eventually(() => last(counts) === 5, 5000, "a count of 5");
      assert.ok(counts.length <= 5, `at most one event per change: ${JSON.stringify(counts)}`);
      assert.equal(watcher.channel("counted").subscriptionCount, 5, "pusher-js keeps the count on the channel");

      const privateCounts = await countsOf(watcher, "private-counted");
      await subscribed(await client(), "private-counted");
      await eventually(() => last(privateCounts) === 2, 5000, "the private channel's count");

      const memberCounts = await countsOf(await client("ann"), "presence-counted");
      await subscribed(await client("bob"), "presence-counted");
      await sleep(1500); // Longer than the announcement interval.
      assert.deepEqual(memberCounts, [], "no subscription counts on presence channels");
    } finally {
      disconnectAll();
      await own.stop();
    }
  });

  test("under churn the count is announced at most once a second, and settles on the final count", BOUNDED, async () => {
    const own = await startFlux({ FLUX_SUBSCRIPTION_COUNT_EVENTS: "true" });
    try {
      const client = () => connected(pusherClient(APP.key, { port: own.port }));
      const counts = await countsOf(await client(), "churned");
      await eventually(() => last(counts) === 1, 5000, "the watcher's own count");
      const churners = await Promise.all(Array.from({ length: 20 }, client));
      const before = counts.length;
      const started = Date.now();
      let changes = 0;
      // Each churner joins and leaves five times, then the first ten stay: 210 changes.
      await Promise.all(
        churners.map(async (pusher, i) => {
          for (let round = 0; round < 5; round++) {
            await subscribed(pusher, "churned");
            pusher.unsubscribe("churned");
            changes += 2;
            await sleep(10);
          }
          if (i < 10) {
            await subscribed(pusher, "churned");
            changes += 1;
          }
        }),
      );
      await eventually(() => last(counts) === 11, 5000, "the final count of 11");
      const elapsed = Date.now() - started;
      const announced = counts.length - before;
      assert.ok(announced <= Math.floor(elapsed / 1000) + 2, `${announced} announcements in ${elapsed} ms: more than one a second`);
      assert.ok(announced * 10 < changes, `${announced} announcements for ${changes} changes`);
    } finally {
      disconnectAll();
      await own.stop();
    }
  });
});

describe("raw WebSocket clients (ws)", () => {
  test("connection_established carries socket_id and the configured activity_timeout", BOUNDED, async () => {
    const client = await established();
    assert.match(client.established.socket_id, /^\d+\.\d+$/);
    assert.equal(client.established.activity_timeout, ACTIVITY_TIMEOUT);
  });

  test("pusher:ping gets pusher:pong", BOUNDED, async () => {
    const client = await established();
    client.send({ event: "pusher:ping", data: {} });
    assert.equal((await client.next()).event, "pusher:pong");
  });

  test("an unknown app key gets pusher:error 4001 and close code 4001", BOUNDED, async () => {
    const client = new RawClient(flux.port, "/app/not-a-key?protocol=7");
    const error = await client.next();
    assert.equal(error.event, "pusher:error");
    assert.equal(error.data.code, 4001);
    assert.equal((await client.closed).code, 4001);
  });

  for (const [query, code] of [
    ["protocol=3", 4007],
    ["protocol=seven", 4006],
    ["", 4008],
  ]) {
    test(`"${query}" gets pusher:error ${code} and close code ${code}`, BOUNDED, async () => {
      const client = new RawClient(flux.port, `/app/${APP.key}?${query}`);
      const error = await client.next();
      assert.equal(error.event, "pusher:error");
      assert.equal(error.data.code, code);
      assert.equal((await client.closed).code, code);
    });
  }

  test("a client event on a public channel gets pusher:error", BOUNDED, async () => {
    const client = await established();
    client.send({ event: "pusher:subscribe", data: { channel: "public-room" } });
    assert.equal((await client.next()).event, "pusher_internal:subscription_succeeded");
    client.send({ event: "client-x", channel: "public-room", data: { typing: true } });
    const error = await client.next();
    assert.equal(error.event, "pusher:error");
    assert.match(error.data.message, /private and presence/);
  });

  test("invalid JSON gets pusher:error and the connection stays open", BOUNDED, async () => {
    const client = await established();
    client.send("this is not JSON {");
    const error = await client.next();
    assert.equal(error.event, "pusher:error");
    assert.equal(error.data.code, null, "a code-less error: the client need not reconnect");
    client.send({ event: "pusher:ping", data: {} });
    assert.equal((await client.next()).event, "pusher:pong");
    assert.equal(client.ws.readyState, WebSocket.OPEN);
  });
});

describe("health and per-node limits", () => {
  /**
   * GETs `path` on the gateway on `port` without a signature, on a connection of its own as a
   * load balancer's check would (a stopping gateway closes idle keep-alive connections):
   * `{ status, body }`.
   */
  function health(port, path) {
    return new Promise((resolve, reject) => {
      const request = http.get({ host: "127.0.0.1", port, path, agent: false, timeout: 3000 }, (response) => {
        let text = "";
        response.on("data", (chunk) => (text += chunk));
        response.on("end", () => resolve({ status: response.statusCode, body: JSON.parse(text) }));
      });
      request.on("timeout", () => request.destroy(new Error(`GET ${path} timed out`)));
      request.on("error", reject);
    });
  }

  /**
   * A raw socket past the WebSocket handshake that never answers the server's close: while it is
   * open, a stopping gateway is still draining.
   */
  function lingeringSocket(port) {
    return new Promise((resolve, reject) => {
      const socket = net.connect(port, "127.0.0.1", () =>
        socket.write(
          `GET /app/${APP.key}?protocol=7 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        ),
      );
      socket.once("data", (head) => (head.toString().startsWith("HTTP/1.1 101") ? resolve(socket) : reject(new Error(head.toString()))));
      socket.on("error", reject);
    });
  }

  test("/up and /ready answer 200 while the node serves", BOUNDED, async () => {
    assert.deepEqual(await health(flux.port, "/up"), { status: 200, body: { health: "OK" } });
    assert.deepEqual(await health(flux.port, "/ready"), { status: 200, body: { ready: true } });
  });

  test("past FLUX_MAX_CONNECTIONS pusher-js gets 4004 and stays disconnected; /ready is 503 until clients leave", BOUNDED, async () => {
    const own = await startFlux({ FLUX_MAX_CONNECTIONS: "2" });
    try {
      const first = await connected(pusherClient(APP.key, { port: own.port }));
      const second = await connected(pusherClient(APP.key, { port: own.port }));
      const full = await health(own.port, "/ready");
      assert.equal(full.status, 503);
      assert.match(full.body.error, /connection limit: 2 of 2/);

      const third = pusherClient(APP.key, { port: own.port });
      const states = [];
      third.connection.bind("state_change", ({ current }) => states.push(current));
      const { type, error } = await once(third.connection, "error");
      assert.equal(type, "WebSocketError");
      assert.equal(error.data.code, 4004);
      assert.match(error.data.message, /^Over connection quota/);
      // 4000-4099 means "do not reconnect as is": past pusher-js's 1 s backoff it has not tried again.
      await sleep(1500);
      assert.equal(third.connection.state, "disconnected");
      assert.deepEqual(states, ["disconnected"], "from its one attempt straight to disconnected, never connecting again");

      first.disconnect();
      second.disconnect();
      await eventually(async () => (await health(own.port, "/ready")).status === 200, 5000, "/ready 200 once clients left");
      await connected(pusherClient(APP.key, { port: own.port }));
    } finally {
      for (const client of openClients.splice(0)) client.disconnect();
      await own.stop();
    }
  });

  test("past FLUX_MAX_CHANNELS_PER_CONNECTION pusher-js reports subscription_error LimitReached on the channel", BOUNDED, async () => {
    const own = await startFlux({ FLUX_MAX_CHANNELS_PER_CONNECTION: "3" });
    try {
      const pusher = pusherClient(APP.key, { port: own.port });
      const held = [];
      for (const name of ["cap-0", "cap-1", "cap-2"]) held.push(await subscribed(pusher, name));
      const refused = pusher.subscribe("cap-3");
      const error = await once(refused, "pusher:subscription_error");
      assert.equal(error.type, "LimitReached");
      assert.equal(error.status, 400);
      assert.match(error.error, /at most 3 channels/);
      assert.equal(refused.subscribed, false);
      // The channels it holds are served as before.
      const received = once(held[0], "still-here");
      await newPusherServer(own.port).trigger("cap-0", "still-here", { ok: true });
      assert.deepEqual(await received, { ok: true });
    } finally {
      for (const client of openClients.splice(0)) client.disconnect();
      await own.stop();
    }
  });

  test("after SIGTERM, while clients drain, /ready is 503, /up is 200 and pusher-js arriving then backs off", BOUNDED, async () => {
    const own = await startFlux();
    const holder = await lingeringSocket(own.port);
    const stopped = own.stop(); // Resolves once the process has exited 0.
    await eventually(async () => (await health(own.port, "/ready")).status === 503, 5000, "/ready 503 after SIGTERM");
    assert.match((await health(own.port, "/ready")).body.error, /^shutting down/);
    assert.deepEqual(await health(own.port, "/up"), { status: 200, body: { health: "OK" } });

    const late = pusherClient(APP.key, { port: own.port });
    const { error } = await once(late.connection, "error");
    assert.equal(error.data.code, 4100, "4100-4199: reconnect after backing off, by when the balancer has another node");
    late.disconnect();

    holder.destroy(); // The last client goes: the drain ends and the process exits 0.
    await stopped;
  });
});

describe("shutdown", () => {
  test("SIGTERM closes every client with 4200 and the process exits 0", BOUNDED, async () => {
    // Its own gateway: the shared one must outlive this test.
    const own = await startFlux();
    const clients = await Promise.all([1, 2, 3].map(() => established(own.port)));
    clients[0].send({ event: "pusher:subscribe", data: { channel: "going-away" } });
    await clients[0].next();
    await own.stop();
    const closes = await Promise.all(clients.map((client) => client.closed));
    assert.deepEqual(closes.map((close) => close.code), [4200, 4200, 4200]);
  });
});
