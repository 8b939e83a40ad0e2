//! Several nodes on one real redis-server (started by the test) act as one server: events,
//! exclusions, queries and terminations cross nodes; a node that stops, dies or loses Redis
//! leaves the cluster's counts; a Redis restart is repaired by a resync.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::webhook_receiver::Receiver;
use common::*;
use flux::config::Config;
use flux::gateway::Gateway;
use flux::pusher::signature::{channel_auth, user_auth};
use serde_json::{json, Value};

/// A node of a test cluster: its own id, the test's Redis and prefix.
fn node_config(redis: &RedisServer, id: &str, timeout_ms: u64) -> Config {
    Config {
        redis_url: Some(redis.url()),
        node_id: Some(id.into()),
        node_timeout_ms: timeout_ms,
        redis_prefix: format!("test{}", redis.port),
        ..config()
    }
}

/// Whether `gateway` sees `others` other nodes, all with current counts.
fn sees(gateway: &Gateway, others: usize) -> bool {
    gateway.observer().cluster().is_some_and(|c| c.link_up && c.nodes.len() == others && c.nodes.iter().all(|n| n.synced))
}

/// Starts `ids.len()` nodes and waits until each sees the others.
fn start_cluster(redis: &RedisServer, ids: &[&str], timeout_ms: u64) -> Vec<Gateway> {
    let nodes: Vec<Gateway> = ids.iter().map(|id| start(&node_config(redis, id, timeout_ms))).collect();
    assert!(wait_until(Duration::from_secs(10), || nodes.iter().all(|n| sees(n, ids.len() - 1))), "the nodes never met");
    nodes
}

/// `subscription_count` of `channel` as `addr` answers it (0 when unoccupied).
fn subscription_count(addr: SocketAddr, channel: &str) -> u64 {
    let (status, body) = rest(addr, "GET", &format!("/apps/app-id/channels/{channel}"), "", &[("info", "subscription_count")]);
    assert_eq!(status, 200, "{body}");
    body["subscription_count"].as_u64().unwrap_or(0)
}

/// Waits until `addr` reports `expected` subscriptions to `channel`.
fn wait_for_count(addr: SocketAddr, channel: &str, expected: u64, within: Duration) -> bool {
    wait_until(within, || subscription_count(addr, channel) == expected)
}

/// Asserts that nothing more arrives for `client` within a short wait.
fn nothing_more(client: &mut Client) {
    if let Some(event) = poll_event(client, Duration::from_millis(300)) {
        panic!("expected nothing more, got {event}");
    }
}

fn subscribed(addr: SocketAddr, channel: &str) -> Client {
    let mut client = Client::connect(addr);
    client.subscribe(channel);
    client
}

#[test]
fn events_published_on_one_node_reach_every_node_once_in_order() {
    let Some(redis) = RedisServer::start() else { return };
    let nodes = start_cluster(&redis, &["a", "b", "c"], 5_000);
    let addrs: Vec<SocketAddr> = nodes.iter().map(Gateway::local_addr).collect();
    let mut clients: Vec<Client> = addrs.iter().flat_map(|&addr| [subscribed(addr, "chat"), subscribed(addr, "chat")]).collect();
    for &addr in &addrs {
        assert!(wait_for_count(addr, "chat", 6, Duration::from_secs(3)), "every node counts all six");
    }
    for (i, &addr) in addrs.iter().enumerate() {
        for n in 0..20 {
            assert_eq!(publish(addr, &["chat"], "seq", &format!("{i}:{n}"), None).0, 200);
        }
    }
    // Each publisher's events arrive in its order; two nodes' events may interleave.
    for client in &mut clients {
        let mut next = vec![0; addrs.len()];
        for _ in 0..20 * addrs.len() {
            let event = client.next_event();
            assert_eq!(event["event"], "seq", "{event}");
            let (node, n) = event["data"].as_str().and_then(|d| d.split_once(':')).expect("node:n");
            let node: usize = node.parse().expect("node");
            assert_eq!(n, next[node].to_string(), "in publish order for node {node}");
            next[node] += 1;
        }
        nothing_more(client);
    }
    let counters = nodes[1].observer().cluster().expect("clustered").counters;
    assert!(counters.messages_in >= 40, "b read the 40 events of a and c: {counters:?}");
}

#[test]
fn socket_id_exclusion_works_across_nodes() {
    let Some(redis) = RedisServer::start() else { return };
    let nodes = start_cluster(&redis, &["a", "b"], 5_000);
    let (a, b) = (nodes[0].local_addr(), nodes[1].local_addr());
    let mut excluded = subscribed(b, "room");
    let mut other = subscribed(b, "room");
    assert!(wait_for_count(a, "room", 2, Duration::from_secs(3)));
    assert_eq!(publish(a, &["room"], "hello", "{}", Some(&excluded.socket_id)).0, 200);
    assert_eq!(other.next_event()["event"], "hello");
    nothing_more(&mut excluded);
    // A client event sent on a is not echoed to its sender, and reaches b.
    let mut sender = subscribed_private(a, "private-room");
    let mut listener = subscribed_private(b, "private-room");
    assert!(wait_for_count(a, "private-room", 2, Duration::from_secs(3)));
    sender.send(json!({"event": "client-typing", "channel": "private-room", "data": {"who": "sender"}}));
    let event = listener.next_event();
    assert_eq!((event["event"].as_str(), event["channel"].as_str()), (Some("client-typing"), Some("private-room")), "{event}");
    nothing_more(&mut sender);
}

fn subscribed_private(addr: SocketAddr, channel: &str) -> Client {
    let mut client = Client::connect(addr);
    let auth = channel_auth(&app(), &client.socket_id, channel, None);
    client.send(json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth}}));
    assert_eq!(client.next_event()["event"], "pusher_internal:subscription_succeeded");
    client
}

#[test]
fn channel_queries_answer_for_the_whole_cluster() {
    let Some(redis) = RedisServer::start() else { return };
    let nodes = start_cluster(&redis, &["a", "b"], 5_000);
    let (a, b) = (nodes[0].local_addr(), nodes[1].local_addr());
    let mut on_a = subscribed(a, "news-1");
    let _on_b = subscribed(b, "news-2");
    let _also_on_b = subscribed(b, "news-1");
    assert!(wait_for_count(b, "news-1", 2, Duration::from_secs(2)), "within about a second");
    assert!(wait_for_count(a, "news-2", 1, Duration::from_secs(2)) && wait_for_count(a, "news-1", 2, Duration::from_secs(2)));
    let (status, body) = rest(a, "GET", "/apps/app-id/channels", "", &[("filter_by_prefix", "news-"), ("info", "subscription_count")]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["channels"], json!({"news-1": {"subscription_count": 2}, "news-2": {"subscription_count": 1}}));
    on_a.send(json!({"event": "pusher:unsubscribe", "data": {"channel": "news-1"}}));
    assert!(wait_for_count(b, "news-1", 1, Duration::from_secs(2)));
    drop(_also_on_b);
    assert!(wait_until(Duration::from_secs(2), || {
        let (_, body) = rest(a, "GET", "/apps/app-id/channels/news-1", "", &[]);
        body["occupied"] == json!(false)
    }));
}

#[test]
fn terminate_connections_closes_the_user_on_every_node() {
    let Some(redis) = RedisServer::start() else { return };
    let nodes = start_cluster(&redis, &["a", "b"], 5_000);
    let (a, b) = (nodes[0].local_addr(), nodes[1].local_addr());
    let sign_in = |addr: SocketAddr, user: &str| {
        let mut client = Client::connect(addr);
        let user_data = json!({"id": user}).to_string();
        let auth = user_auth(&app(), &client.socket_id, &user_data);
        client.send(json!({"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}}));
        assert_eq!(client.next_event()["event"], "pusher:signin_success");
        client
    };
    let mut on_a = sign_in(a, "u1");
    let mut on_b = sign_in(b, "u1");
    let mut bystander = sign_in(b, "u2");
    let (status, body) = rest(a, "POST", "/apps/app-id/users/u1/terminate_connections", "{}", &[]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(close_code(&mut on_a.ws), Some(4009));
    assert_eq!(close_code(&mut on_b.ws), Some(4009), "closed on the other node too");
    nothing_more(&mut bystander);
}

#[test]
fn a_stopped_node_tells_the_others_at_once() {
    let Some(redis) = RedisServer::start() else { return };
    let mut nodes = start_cluster(&redis, &["a", "b"], 60_000);
    let a = nodes[0].local_addr();
    let _client = subscribed(nodes[1].local_addr(), "chat");
    assert!(wait_for_count(a, "chat", 1, Duration::from_secs(2)));
    let b = nodes.pop().expect("b");
    let started = Instant::now();
    b.stop();
    b.join();
    assert!(wait_for_count(a, "chat", 0, Duration::from_secs(5)));
    assert!(started.elapsed() < Duration::from_secs(10), "long before the 60 s timeout");
    assert!(sees(&nodes[0], 0), "b is gone from a's view");
}

/// A `flux` process on free ports, killed when dropped.
struct NodeProcess {
    child: Child,
    addr: SocketAddr,
}

impl NodeProcess {
    fn start(redis: &RedisServer, id: &str, timeout_ms: u64) -> NodeProcess {
        let free = || TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let (port, dashboard) = (free(), free());
        let child = Command::new(env!("CARGO_BIN_EXE_flux"))
            .args(["--port", &port.to_string(), "--dashboard-port", &dashboard.to_string(), "--workers", "2"])
            .args(["--redis-url", &redis.url(), "--node-id", id, "--node-timeout-ms", &timeout_ms.to_string()])
            .args(["--redis-prefix", &format!("test{}", redis.port)])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("flux starts");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        assert!(wait_until(Duration::from_secs(10), || TcpStream::connect(addr).is_ok()), "node {id} listens");
        NodeProcess { child, addr }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_killed_nodes_members_and_subscriptions_leave_within_its_timeout() {
    let Some(redis) = RedisServer::start() else { return };
    const TIMEOUT_MS: u64 = 1_500;
    let survivor = NodeProcess::start(&redis, "survivor", TIMEOUT_MS);
    let mut victim = NodeProcess::start(&redis, "victim", TIMEOUT_MS);
    let _here = subscribed(survivor.addr, "chat");
    let _there = subscribed(victim.addr, "chat");
    assert!(wait_for_count(survivor.addr, "chat", 2, Duration::from_secs(5)), "the nodes met");
    let mut bob = Client::connect(survivor.addr);
    join_presence(&mut bob, PRESENCE, "bob");
    let mut carol = Client::connect(victim.addr);
    join_presence(&mut carol, PRESENCE, "carol");
    assert_eq!(member_event(&mut bob), ("pusher_internal:member_added".into(), "carol".into()));
    let killed = Instant::now();
    victim.child.kill().expect("SIGKILL");
    let _ = victim.child.wait();
    assert_eq!(member_event(&mut bob), ("pusher_internal:member_removed".into(), "carol".into()), "no ghost member");
    assert!(killed.elapsed() < Duration::from_millis(TIMEOUT_MS + 1_000), "within the timeout (+1 s): {:?}", killed.elapsed());
    assert!(wait_for_count(survivor.addr, "chat", 1, Duration::from_millis(500)), "its subscriptions left the counts with it");
    assert_eq!(users(survivor.addr, PRESENCE), ["bob"]);
    assert!(killed.elapsed() >= Duration::from_millis(TIMEOUT_MS / 2), "not before the node could be judged silent");
}

#[test]
fn redis_going_away_keeps_each_node_serving_and_a_restart_resyncs() {
    let Some(mut redis) = RedisServer::start() else { return };
    let nodes = start_cluster(&redis, &["a", "b"], 2_000);
    let (a, b) = (nodes[0].local_addr(), nodes[1].local_addr());
    let mut first = subscribed(a, "chat");
    assert!(wait_for_count(b, "chat", 1, Duration::from_secs(2)));
    redis.kill();
    assert!(wait_until(Duration::from_secs(5), || nodes.iter().all(|n| n.observer().cluster().is_some_and(|c| !c.link_up))));
    // Each node still serves its own clients.
    assert_eq!(publish(a, &["chat"], "local", "1", None).0, 200);
    assert_eq!(first.next_event()["event"], "local");
    let _second = subscribed(a, "chat");
    // Past the node timeout, each sees the other as dead: only its own clients count.
    assert!(wait_for_count(b, "chat", 0, Duration::from_secs(5)));
    redis.restart();
    assert!(wait_until(Duration::from_secs(15), || sees(&nodes[0], 1) && sees(&nodes[1], 1)), "the link came back by itself");
    assert!(wait_for_count(b, "chat", 2, Duration::from_secs(3)), "a's state, resynced, includes what changed meanwhile");
    assert_eq!(publish(b, &["chat"], "across", "2", None).0, 200);
    assert_eq!(first.next_event()["event"], "across");
    let status = nodes[0].observer().cluster().expect("clustered");
    assert!(status.counters.reconnects >= 1, "{status:?}");
}

#[test]
fn the_status_names_the_node_and_a_single_node_has_none() {
    let Some(redis) = RedisServer::start() else { return };
    let nodes = start_cluster(&redis, &["named-1"], 5_000);
    let status = nodes[0].observer().cluster().expect("clustered");
    assert_eq!(status.node_id, "named-1");
    assert!(start(&config()).observer().cluster().is_none(), "no FLUX_REDIS_URL: a single node");
}

const PRESENCE: &str = "presence-guild";

/// The user ids `GET /channels/{channel}/users` lists on `addr`, sorted.
fn users(addr: SocketAddr, channel: &str) -> Vec<String> {
    let (status, body) = rest(addr, "GET", &format!("/apps/app-id/channels/{channel}/users"), "", &[]);
    assert_eq!(status, 200, "{body}");
    let mut ids: Vec<String> = body["users"].as_array().into_iter().flatten().filter_map(|u| u["id"].as_str().map(String::from)).collect();
    ids.sort();
    ids
}

/// The next event, which must be a member event: its name and user.
fn member_event(client: &mut Client) -> (String, String) {
    let event = client.next_event();
    let data: Value = serde_json::from_str(event["data"].as_str().unwrap_or("{}")).expect("data is JSON");
    (event["event"].as_str().unwrap_or("").to_string(), data["user_id"].as_str().unwrap_or("").to_string())
}

/// The ids of a `subscription_succeeded`'s member list, sorted.
fn member_ids(succeeded: &Value) -> Vec<String> {
    let data: Value = serde_json::from_str(succeeded["data"].as_str().expect("data")).expect("JSON");
    let mut ids: Vec<String> =
        data["presence"]["ids"].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(String::from)).collect();
    ids.sort();
    ids
}

/// Longer than the coalescing window and a flush, so an announcement that was due has come.
const QUIET: Duration = Duration::from_millis(800);

#[test]
fn presence_is_one_roster_for_the_cluster() {
    let Some(redis) = RedisServer::start() else { return };
    let nodes = start_cluster(&redis, &["a", "b"], 5_000);
    let (a, b) = (nodes[0].local_addr(), nodes[1].local_addr());
    let mut alice = Client::connect(a);
    join_presence(&mut alice, PRESENCE, "alice");
    assert!(wait_until(Duration::from_secs(2), || users(b, PRESENCE) == ["alice"]), "b knows alice within about a second");
    // Past b's coalescing window, alice's member_added has gone out there: bob's list holds her.
    std::thread::sleep(QUIET);
    let mut bob = Client::connect(b);
    assert_eq!(member_ids(&join_presence(&mut bob, PRESENCE, "bob")), ["alice", "bob"], "the list holds members on every node");
    assert_eq!(member_event(&mut alice), ("pusher_internal:member_added".into(), "bob".into()));
    // Alice's second connection, on the other node: still one member, nobody hears of it.
    let mut alice_again = Client::connect(b);
    assert_eq!(member_ids(&join_presence(&mut alice_again, PRESENCE, "alice")), ["alice", "bob"]);
    assert_eq!(poll_event(&mut bob, QUIET), None);
    assert_eq!(poll_event(&mut alice, QUIET), None);
    assert_eq!(users(a, PRESENCE), ["alice", "bob"]);
    // Her first connection leaves: she is still a member, on b.
    drop(alice);
    assert_eq!(poll_event(&mut bob, QUIET), None, "no member_removed while she is on b");
    assert_eq!(users(a, PRESENCE), ["alice", "bob"]);
    // Her last connection leaves: removed, once.
    drop(alice_again);
    assert_eq!(member_event(&mut bob), ("pusher_internal:member_removed".into(), "alice".into()));
    assert_eq!(poll_event(&mut bob, QUIET), None);
    assert!(wait_until(Duration::from_secs(2), || users(a, PRESENCE) == ["bob"]));
    let (_, body) = rest(a, "GET", &format!("/apps/app-id/channels/{PRESENCE}"), "", &[("info", "user_count")]);
    assert_eq!(body["user_count"], 1, "{body}");
}

#[test]
fn the_presence_limit_counts_the_cluster() {
    let Some(redis) = RedisServer::start() else { return };
    let config = |id: &str| Config { presence_max_members: 2, ..node_config(&redis, id, 5_000) };
    let nodes: Vec<Gateway> = ["a", "b"].iter().map(|id| start(&config(id))).collect();
    assert!(wait_until(Duration::from_secs(10), || nodes.iter().all(|n| sees(n, 1))));
    let (a, b) = (nodes[0].local_addr(), nodes[1].local_addr());
    let mut first = Client::connect(a);
    join_presence(&mut first, PRESENCE, "u1");
    let mut second = Client::connect(a);
    join_presence(&mut second, PRESENCE, "u2");
    assert!(wait_until(Duration::from_secs(2), || users(b, PRESENCE).len() == 2));
    let mut third = Client::connect(b);
    let channel_data = json!({"user_id": "u3"}).to_string();
    let auth = channel_auth(&app(), &third.socket_id, PRESENCE, Some(&channel_data));
    third.send(json!({"event": "pusher:subscribe", "data": {"channel": PRESENCE, "auth": auth, "channel_data": channel_data}}));
    assert_eq!(third.next_event()["event"], "pusher:subscription_error", "two members on a fill the channel for b too");
}

/// Three nodes, a, b and c, that post their webhooks to `receiver`, once they see each other.
fn webhook_cluster(redis: &RedisServer, receiver: &Receiver) -> Vec<Gateway> {
    let config = |id: &str| Config { webhook_url: Some(receiver.url.clone()), webhook_batch_ms: 20, ..node_config(redis, id, 5_000) };
    let nodes: Vec<Gateway> = ["a", "b", "c"].iter().map(|id| start(&config(id))).collect();
    assert!(wait_until(Duration::from_secs(10), || nodes.iter().all(|n| sees(n, 2))), "the nodes never met");
    nodes
}

#[test]
fn webhooks_are_sent_once_per_cluster() {
    let Some(redis) = RedisServer::start() else { return };
    let receiver = Receiver::answering(&[]);
    let nodes = webhook_cluster(&redis, &receiver);
    let addrs: Vec<SocketAddr> = nodes.iter().map(Gateway::local_addr).collect();
    let mut clients = Vec::new();
    for (i, &addr) in addrs.iter().enumerate() {
        clients.push(subscribed(addr, "chat"));
        let mut member = Client::connect(addr);
        join_presence(&mut member, PRESENCE, if i == 2 { "bob" } else { "alice" });
        clients.push(member);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(wait_for_count(addrs[0], "chat", 3, Duration::from_secs(2)));
    std::thread::sleep(QUIET);
    for client in clients.drain(..) {
        drop(client);
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every webhook until the endpoint has been quiet for a while.
    let mut events: Vec<(String, String, String)> = receiver
        .events_until_quiet(Duration::from_secs(2))
        .iter()
        .map(|event| {
            let field = |k: &str| event[k].as_str().unwrap_or("").to_string();
            (field("name"), field("channel"), field("user_id"))
        })
        .collect();
    events.sort();
    let expected: Vec<(String, String, String)> = [
        ("channel_occupied", "chat", ""),
        ("channel_occupied", PRESENCE, ""),
        ("channel_vacated", "chat", ""),
        ("channel_vacated", PRESENCE, ""),
        ("member_added", PRESENCE, "alice"),
        ("member_added", PRESENCE, "bob"),
        ("member_removed", PRESENCE, "alice"),
        ("member_removed", PRESENCE, "bob"),
    ]
    .iter()
    .map(|(n, c, u)| (n.to_string(), c.to_string(), u.to_string()))
    .collect();
    assert_eq!(events, expected, "each at its cluster-wide transition, by one node");
}

/// The body of a plain GET.
fn get(url: &str) -> String {
    ureq::get(url).call().expect("GET").into_body().read_to_string().expect("body")
}

#[test]
fn the_dashboard_and_metrics_show_the_cluster() {
    let Some(redis) = RedisServer::start() else { return };
    let nodes = start_cluster(&redis, &["a", "b"], 5_000);
    let dashboard =
        flux::dashboard::Dashboard::start(SocketAddr::from(([127, 0, 0, 1], 0)), nodes[0].observer().clone()).expect("dashboard starts");
    let mut on_a = subscribed(nodes[0].local_addr(), "chat");
    assert!(wait_for_count(nodes[1].local_addr(), "chat", 1, Duration::from_secs(2)));
    assert_eq!(publish(nodes[1].local_addr(), &["chat"], "hello", "{}", None).0, 200);
    assert_eq!(on_a.next_event()["event"], "hello");
    let stats: Value = serde_json::from_str(&get(&format!("http://{}/api/stats", dashboard.local_addr()))).expect("JSON");
    let cluster = &stats["cluster"];
    assert_eq!((cluster["node_id"].as_str(), cluster["link_up"].as_bool()), (Some("a"), Some(true)), "{cluster}");
    assert_eq!(cluster["nodes"][0]["id"], "b");
    assert_eq!(cluster["nodes"][0]["addr"], nodes[1].local_addr().to_string());
    assert!(cluster["messages_in"].as_u64() >= Some(1) && cluster["messages_out"].as_u64() >= Some(1), "{cluster}");
    assert!(
        wait_until(Duration::from_secs(3), || {
            let stats: Value = serde_json::from_str(&get(&format!("http://{}/api/stats", dashboard.local_addr()))).expect("JSON");
            stats["cluster"]["remote_delivery"]["count"].as_u64() >= Some(1)
        }),
        "the event from b counts in the cross-node delivery time"
    );
    let metrics = get(&format!("http://{}/metrics", dashboard.local_addr()));
    for line in [
        "flux_cluster_link_up 1",
        "flux_cluster_nodes 1",
        "flux_cluster_messages_total{direction=\"in\"}",
        "flux_cluster_delivery_duration_seconds_count",
    ] {
        assert!(metrics.contains(line), "{line} in /metrics:\n{metrics}");
    }
    dashboard.stop();
}

/// Sends `signal` (`STOP`, `CONT`) to a node process.
fn signal(node: &NodeProcess, signal: &str) {
    let sent = Command::new("kill").args([&format!("-{signal}"), &node.child.id().to_string()]).status().expect("kill runs");
    assert!(sent.success(), "kill -{signal}");
}

#[test]
fn a_frozen_node_is_dead_to_the_others_and_comes_back_with_only_what_it_still_holds() {
    let Some(redis) = RedisServer::start() else { return };
    const TIMEOUT_MS: u64 = 1_500;
    let survivor = NodeProcess::start(&redis, "survivor", TIMEOUT_MS);
    let frozen = NodeProcess::start(&redis, "frozen", TIMEOUT_MS);
    let _there = subscribed(frozen.addr, "chat");
    let mut bob = Client::connect(survivor.addr);
    join_presence(&mut bob, PRESENCE, "bob");
    let mut carol = Client::connect(frozen.addr);
    join_presence(&mut carol, PRESENCE, "carol");
    assert_eq!(member_event(&mut bob), ("pusher_internal:member_added".into(), "carol".into()));
    signal(&frozen, "STOP");
    assert_eq!(member_event(&mut bob), ("pusher_internal:member_removed".into(), "carol".into()), "a frozen node is dead");
    assert!(wait_for_count(survivor.addr, "chat", 0, Duration::from_secs(1)));
    // Carol leaves while her node is frozen; it only learns of it when it wakes.
    drop(carol);
    signal(&frozen, "CONT");
    assert!(wait_for_count(survivor.addr, "chat", 1, Duration::from_secs(5)), "the node came back with what it holds");
    assert_eq!(poll_event(&mut bob, QUIET), None, "carol is not resurrected");
    assert_eq!(users(survivor.addr, PRESENCE), ["bob"]);
}

/// What a new subscriber of cache channel `channel` on `addr` gets right after its
/// `subscription_succeeded`: the channel's last event, or `pusher:cache_miss`.
fn replayed(addr: SocketAddr, channel: &str) -> Value {
    let mut client = subscribed(addr, channel);
    let event = client.next_event();
    assert_eq!(event["channel"], channel, "{event}");
    event
}

#[test]
fn a_cache_channels_last_event_outlives_its_node_and_reaches_a_node_that_starts_later() {
    let Some(redis) = RedisServer::start() else { return };
    let mut nodes = start_cluster(&redis, &["a", "b"], 5_000);
    let (a, b) = (nodes[0].local_addr(), nodes[1].local_addr());
    assert_eq!(publish(a, &["cache-price"], "tick", r#"{"usd":1}"#, None).0, 200);
    // Nobody subscribes anywhere: b keeps the event as it goes by on the bus.
    assert!(wait_until(Duration::from_secs(3), || replayed(b, "cache-price")["data"] == r#"{"usd":1}"#));
    assert_eq!(publish(b, &["cache-price"], "tick", r#"{"usd":2}"#, None).0, 200);
    assert!(wait_until(Duration::from_secs(3), || replayed(a, "cache-price")["data"] == r#"{"usd":2}"#));
    // b, where the last event was published, goes; c starts after it and reads it from Redis.
    let gone = nodes.pop().expect("b");
    gone.stop();
    gone.join();
    let c = start(&node_config(&redis, "c", 5_000));
    let loaded = |node: &Gateway| node.observer().cluster().is_some_and(|c| c.counters.last_event_loads >= 1);
    assert!(wait_until(Duration::from_secs(10), || sees(&c, 1) && loaded(&c)), "c joined and read the cache back");
    let event = replayed(c.local_addr(), "cache-price");
    assert_eq!((event["event"].as_str(), event["data"].as_str()), (Some("tick"), Some(r#"{"usd":2}"#)), "{event}");
    assert!(replayed(c.local_addr(), "cache-other")["event"] == "pusher:cache_miss");
    assert_eq!(c.observer().cluster().expect("clustered").counters.last_events_loaded, 1, "one cache channel in Redis");
}

#[test]
fn cache_misses_on_every_node_are_one_cache_miss_webhook() {
    let Some(redis) = RedisServer::start() else { return };
    let receiver = Receiver::answering(&[]);
    let nodes = webhook_cluster(&redis, &receiver);
    for node in &nodes {
        for _ in 0..2 {
            assert_eq!(replayed(node.local_addr(), "cache-empty")["event"], "pusher:cache_miss");
        }
    }
    let misses: Vec<Value> =
        receiver.events_until_quiet(Duration::from_secs(2)).into_iter().filter(|e| e["name"] == "cache_miss").collect();
    assert_eq!(misses, [json!({"name": "cache_miss", "channel": "cache-empty"})], "six misses on three nodes, one report");
}

#[test]
fn subscription_counts_are_the_clusters() {
    let Some(redis) = RedisServer::start() else { return };
    let config = |id: &str| {
        let mut config = node_config(&redis, id, 5_000);
        config.app.subscription_count_events = true;
        config
    };
    let nodes: Vec<Gateway> = ["a", "b"].iter().map(|id| start(&config(id))).collect();
    assert!(wait_until(Duration::from_secs(10), || nodes.iter().all(|n| sees(n, 1))));
    let (a, b) = (nodes[0].local_addr(), nodes[1].local_addr());
    let mut watcher = subscribed(a, "counted");
    let count = |event: Value| -> u64 {
        assert_eq!(event["event"], "pusher_internal:subscription_count", "{event}");
        let data: Value = serde_json::from_str(event["data"].as_str().expect("data is a string")).expect("JSON");
        data["subscription_count"].as_u64().expect("a count")
    };
    assert_eq!(count(watcher.next_event()), 1);
    let _there = [subscribed(b, "counted"), subscribed(b, "counted")];
    // The subscriptions on b reach a within the cluster's flush interval, then a's next
    // announcement (at most a second after its last) carries them.
    let mut seen = 1;
    while seen != 3 {
        seen = count(watcher.next_event());
        assert!((1..=3).contains(&seen), "{seen}");
    }
}

/// Two apps on two nodes: a channel name of one app is not the other's anywhere in the cluster,
/// and an app's max_connections counts its connections on every node.
#[test]
fn apps_stay_apart_across_nodes_and_a_quota_counts_the_cluster() {
    let Some(redis) = RedisServer::start() else { return };
    let file = AppsFile::new(
        "[[apps]]\nid = \"app-id\"\nkey = \"app-key\"\nsecret = \"app-secret\"\nmax_connections = 2\n\n\
         [[apps]]\nid = \"other\"\nkey = \"other-key\"\nsecret = \"other-secret\"\n",
    );
    let config = |id: &str| Config { apps_file: Some(file.0.clone()), ..node_config(&redis, id, 1_000) };
    let nodes: Vec<Gateway> = ["a", "b"].iter().map(|id| start(&config(id))).collect();
    assert!(wait_until(Duration::from_secs(10), || nodes.iter().all(|n| sees(n, 1))), "the nodes never met");
    let (a, b) = (nodes[0].local_addr(), nodes[1].local_addr());

    let mut mine = Client::connect(a);
    mine.subscribe("chat");
    let mut theirs = Client::connect_to(b, "other-key");
    theirs.subscribe("chat");
    assert!(wait_for_count(a, "chat", 1, Duration::from_secs(5)), "app-id's chat holds one subscriber, not two");
    let other =
        flux::pusher::App { id: "other".into(), key: "other-key".into(), secret: "other-secret".into(), subscription_count_events: false };
    let body = json!({"name": "news", "channel": "chat", "data": "for other"}).to_string();
    assert_eq!(rest_as(&other, a, "POST", "/apps/other/events", &body, &[]).0, 200);
    assert_eq!(theirs.next_event()["data"], "for other", "published on a, delivered on b");
    nothing_more(&mut mine);

    // One of app-id's two connections is on a; once b has heard a's heartbeat, b admits one and
    // refuses the next.
    assert!(wait_until(Duration::from_secs(5), || nodes[1].observer().apps().status()[0].counters.connections_elsewhere == 1));
    let _second = Client::connect(b);
    let mut third = open(b, "/app/app-key?protocol=7");
    assert_eq!(close_code(&mut third), Some(4004), "over app-id's max_connections across the cluster");
    let _other_app_is_free = Client::connect_to(b, "other-key");
    for node in nodes {
        node.stop();
        node.join();
    }
}
