// Three `flux` processes on one redis-server (started here) act as one server to pusher-js and
// the official `pusher` SDK: events, exclusions, queries, presence, terminations and webhooks
// cross nodes; a node killed with SIGKILL or stopped with SIGTERM leaves no ghost; a Redis
// restart in the middle is repaired by itself.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import { APP, connected, eventually, newPusherClient, newPusherServer, record, sleep, startFlux, startRedis, subscribed } from "./flux.mjs";

/** Every test is bounded; a hang fails its test instead of stalling the run. */
const BOUNDED = { timeout: 30_000 };

/** Short, so a death is seen quickly; heartbeats go out five times as often. */
const NODE_TIMEOUT_MS = 2_000;

let redis;
/** Every webhook event the receiver got, checked with the SDK's signature validation. */
const hooks = [];
let invalidHooks = 0;
let receiver;

before(async () => {
  redis = await startRedis();
  receiver = http.createServer((request, response) => {
    let body = "";
    request.on("data", (chunk) => (body += chunk));
    request.on("end", () => {
      const webhook = newPusherServer(1).webhook({ headers: request.headers, rawBody: body });
      if (webhook.isValid()) hooks.push(...webhook.getEvents());
      else invalidHooks++;
      response.end("{}");
    });
  });
  await new Promise((resolve) => receiver.listen(0, "127.0.0.1", resolve));
}, BOUNDED);

after(async () => {
  receiver?.close();
  await redis?.kill();
}, BOUNDED);

/** Starts `count` nodes on the shared Redis under a prefix of their own, and waits until they meet. */
async function startCluster(count, prefix, env = {}) {
  const nodes = [];
  for (let i = 1; i <= count; i++) {
    nodes.push(
      await startFlux({
        FLUX_REDIS_URL: redis.url,
        FLUX_REDIS_PREFIX: prefix,
        FLUX_NODE_ID: `${prefix}-${i}`,
        FLUX_NODE_TIMEOUT_MS: String(NODE_TIMEOUT_MS),
        ...env,
      }),
    );
  }
  // Each node's counts reach the others through Redis: a subscription on every node seen on the first.
  const clients = nodes.map((node) => newPusherClient(node.port));
  await Promise.all(clients.map((client) => subscribed(client, "meet")));
  await eventually(async () => (await count_of(nodes[0], "meet")) === count, 5000, "the nodes to meet");
  clients.forEach((client) => client.disconnect());
  return nodes;
}

/** `subscription_count` of `channel` as `node` answers it through the SDK (0 when unoccupied). */
async function count_of(node, channel) {
  const response = await newPusherServer(node.port).get({ path: `/channels/${channel}`, params: { info: "subscription_count" } });
  return (await response.json()).subscription_count ?? 0;
}

async function users(node, channel) {
  const response = await newPusherServer(node.port).get({ path: `/channels/${channel}/users` });
  return (await response.json()).users.map((u) => u.id).sort();
}

describe("a cluster of three nodes", () => {
  let nodes;
  const clients = [];
  const client = (node, options) => {
    const pusher = newPusherClient(node.port, options);
    clients.push(pusher);
    return pusher;
  };

  before(async () => {
    nodes = await startCluster(3, "e2e", { FLUX_WEBHOOK_URL: `http://127.0.0.1:${receiver.address().port}/hooks`, FLUX_WEBHOOK_BATCH_MS: "20" });
  }, BOUNDED);

  after(async () => {
    clients.forEach((pusher) => pusher.disconnect());
    for (const node of nodes ?? []) await node.stop();
  }, BOUNDED);

  test("events triggered on any node reach subscribers on every node once, in each publisher's order", BOUNDED, async () => {
    const received = [];
    for (const node of nodes) received.push(record(await subscribed(client(node), "news"), "story"));
    await eventually(async () => (await count_of(nodes[0], "news")) === 3, 5000, "three subscribers");
    for (const [i, node] of nodes.entries()) {
      for (let n = 0; n < 10; n++) await newPusherServer(node.port).trigger("news", "story", { node: i, n });
    }
    await eventually(() => received.every((r) => r.length >= 30), 5000, "every event everywhere");
    await sleep(300);
    for (const got of received) {
      assert.equal(got.length, 30, "exactly once");
      for (const i of [0, 1, 2]) assert.deepEqual(got.filter((e) => e.node === i).map((e) => e.n), [...Array(10).keys()]);
    }
  });

  test("socket_id excludes a connection on another node", BOUNDED, async () => {
    const [here, there] = [await connected(client(nodes[0])), await connected(client(nodes[1]))];
    const hereGot = record(await subscribed(here, "excluding"), "said");
    const thereGot = record(await subscribed(there, "excluding"), "said");
    await eventually(async () => (await count_of(nodes[2], "excluding")) === 2, 5000, "both subscriptions");
    await newPusherServer(nodes[2].port).trigger("excluding", "said", { n: 1 }, { socket_id: there.connection.socket_id });
    await newPusherServer(nodes[2].port).trigger("excluding", "said", { n: 2 });
    await eventually(() => hereGot.length === 2 && thereGot.length >= 1, 5000, "the events");
    assert.deepEqual(thereGot, [{ n: 2 }]);
  });

  test("the channels API answers for the whole cluster", BOUNDED, async () => {
    for (const [i, node] of nodes.entries()) {
      for (let k = 0; k <= i; k++) await subscribed(client(node), "stats-room");
    }
    await subscribed(client(nodes[2]), "stats-lobby");
    const expected = { channels: { "stats-lobby": { subscription_count: 1 }, "stats-room": { subscription_count: 6 } } };
    for (const node of nodes) {
      await eventually(
        async () => {
          const response = await newPusherServer(node.port).get({ path: "/channels", params: { filter_by_prefix: "stats-", info: "subscription_count" } });
          return JSON.stringify(await response.json()) === JSON.stringify(expected);
        },
        3000,
        `the cluster's channels on port ${node.port}`,
      );
    }
  });

  test("presence: one roster for the cluster, a user on two nodes is one member", BOUNDED, async () => {
    const ids = (channel) => Object.keys(channel.members.members).sort();
    const annRoom = await subscribed(client(nodes[0], { user: { id: "ann", name: "Ann" } }), "presence-guild");
    const added = record(annRoom, "pusher:member_added");
    const removed = record(annRoom, "pusher:member_removed");
    await eventually(async () => (await users(nodes[1], "presence-guild")).length === 1, 3000, "ann known on node 2");
    await sleep(400); // Past node 2's coalescing window: ann is announced there, so bob's list holds her.
    const bob = client(nodes[1], { user: { id: "bob", name: "Bob" } });
    const bobRoom = await subscribed(bob, "presence-guild");
    assert.deepEqual(ids(bobRoom), ["ann", "bob"]);
    await eventually(() => added.length === 1, 3000, "member_added for bob");
    assert.deepEqual(added, [{ id: "bob", info: { name: "Bob" } }]);
    // Bob again, on the third node: still one member.
    const bobAgain = client(nodes[2], { user: { id: "bob", name: "Bob" } });
    await subscribed(bobAgain, "presence-guild");
    await sleep(600);
    assert.equal(added.length, 1, "no second member_added");
    for (const node of nodes) assert.deepEqual(await users(node, "presence-guild"), ["ann", "bob"]);
    bob.disconnect();
    await sleep(600);
    assert.deepEqual(removed, [], "bob is still on node 3");
    bobAgain.disconnect();
    await eventually(() => removed.length === 1, 3000, "member_removed for bob");
    assert.equal(removed[0].id, "bob");
  });

  test("terminate_connections closes the user's connections on every node", BOUNDED, async () => {
    const user = { id: "user-t", name: "T" };
    const mine = nodes.map((node) => client(node, { user }));
    const bystander = client(nodes[1], { user: { id: "user-b" } });
    await Promise.all([...mine, bystander].map(connected));
    [...mine, bystander].forEach((pusher) => pusher.signin());
    await eventually(() => [...mine, bystander].every((p) => p.user.serverToUserChannel?.subscribed), 5000, "every sign-in");
    await newPusherServer(nodes[0].port).terminateUserConnections("user-t");
    await eventually(() => mine.every((p) => p.connection.state !== "connected"), 5000, "user-t disconnected everywhere");
    assert.equal(bystander.connection.state, "connected");
  });

  test("a #server-to-user event reaches the user on whichever node they are", BOUNDED, async () => {
    const user = { id: "user-s" };
    const pusher = await connected(client(nodes[2], { user }));
    pusher.signin();
    await eventually(() => pusher.user.serverToUserChannel?.subscribed, 5000, "the sign-in");
    const got = [];
    pusher.user.bind("notice", (data) => got.push(data));
    await newPusherServer(nodes[0].port).sendToUser("user-s", "notice", { hello: 1 });
    await eventually(() => got.length === 1, 5000, "the event to the user");
    assert.deepEqual(got, [{ hello: 1 }]);
  });

  test("webhooks: each is sent once by the cluster, at the cluster-wide transition", BOUNDED, async () => {
    hooks.length = 0;
    const members = [client(nodes[0], { user: { id: "hook-a" } }), client(nodes[1], { user: { id: "hook-a" } }), client(nodes[2], { user: { id: "hook-b" } })];
    for (const pusher of members) {
      await subscribed(pusher, "presence-hooked");
      await sleep(200);
    }
    await sleep(600);
    for (const pusher of members) {
      pusher.disconnect();
      await sleep(200);
    }
    const names = () => hooks.filter((h) => h.channel === "presence-hooked").map((h) => `${h.name}${h.user_id ? ":" + h.user_id : ""}`).sort();
    const expected = ["channel_occupied", "channel_vacated", "member_added:hook-a", "member_added:hook-b", "member_removed:hook-a", "member_removed:hook-b"];
    await eventually(() => names().length >= expected.length, 5000, "the webhooks");
    await sleep(1000);
    assert.deepEqual(names(), expected);
    assert.equal(invalidHooks, 0, "every POST signed");
  });
});

describe("failures", () => {
  test("SIGKILL of a node holding a presence member: member_removed within the node timeout, counts right", BOUNDED, async () => {
    const nodes = await startCluster(3, "kill");
    const watchers = [newPusherClient(nodes[0].port, { user: { id: "w0" } }), newPusherClient(nodes[1].port, { user: { id: "w1" } })];
    const removed = [];
    for (const watcher of watchers) {
      const room = await subscribed(watcher, "presence-kill");
      room.bind("pusher:member_removed", (member) => removed.push(member.id));
    }
    const victim = newPusherClient(nodes[2].port, { user: { id: "victim" } });
    await subscribed(victim, "presence-kill");
    await eventually(async () => (await users(nodes[0], "presence-kill")).includes("victim"), 3000, "the victim's member");
    await sleep(400);
    const killed = Date.now();
    await nodes[2].kill("SIGKILL");
    await eventually(() => removed.filter((id) => id === "victim").length === 2, NODE_TIMEOUT_MS + 1000, "member_removed at both watchers");
    assert.ok(Date.now() - killed <= NODE_TIMEOUT_MS + 1000, `within the timeout + 1 s: ${Date.now() - killed} ms`);
    assert.deepEqual(await users(nodes[1], "presence-kill"), ["w0", "w1"]);
    assert.equal(await count_of(nodes[0], "presence-kill"), 2);
    victim.disconnect();
    watchers.forEach((w) => w.disconnect());
    for (const node of nodes.slice(0, 2)) await node.stop();
  });

  test("SIGTERM of a node: the others forget it at once", BOUNDED, async () => {
    const nodes = await startCluster(2, "term", { FLUX_NODE_TIMEOUT_MS: "60000" });
    const client = newPusherClient(nodes[1].port);
    await subscribed(client, "leaving");
    await eventually(async () => (await count_of(nodes[0], "leaving")) === 1, 3000, "the subscription");
    const stopped = Date.now();
    await nodes[1].stop();
    await eventually(async () => (await count_of(nodes[0], "leaving")) === 0, 3000, "the count to drop");
    assert.ok(Date.now() - stopped < 5000, "long before the 60 s timeout");
    client.disconnect();
    await nodes[0].stop();
  });

  test("a Redis restart in the middle: each node keeps serving, and the cluster comes back by itself", BOUNDED, async () => {
    const nodes = await startCluster(2, "restart");
    const [a, b] = [newPusherClient(nodes[0].port), newPusherClient(nodes[1].port)];
    const got = record(await subscribed(a, "steady"), "tick");
    await subscribed(b, "steady");
    await eventually(async () => (await count_of(nodes[0], "steady")) === 2, 3000, "both subscriptions");
    await redis.kill();
    // Still served locally while Redis is down.
    await newPusherServer(nodes[0].port).trigger("steady", "tick", { n: "local" });
    await eventually(() => got.length === 1, 3000, "the local event");
    await redis.restart();
    // Back by itself: an event published on the other node reaches a again, and counts resync.
    await eventually(async () => (await count_of(nodes[0], "steady")) === 2, 15_000, "the counts after the restart");
    await eventually(
      async () => {
        await newPusherServer(nodes[1].port).trigger("steady", "tick", { n: "across" });
        await sleep(200);
        return got.some((e) => e.n === "across");
      },
      10_000,
      "an event across nodes after the restart",
    );
    a.disconnect();
    b.disconnect();
    for (const node of nodes) await node.stop();
  });
});
