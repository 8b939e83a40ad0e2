//! The signed REST API over loopback: publishing to subscribers spread over several workers,
//! exclusion, batches, channel queries, and every refusal with its status and JSON message.

mod common;

use std::time::Duration;

use common::{publish, rest, wait_until, Client};
use flux::config::Config;
use serde_json::{json, Value};

/// A node of four workers, so subscribers of one channel live on several of them.
fn node() -> flux::gateway::Gateway {
    common::start(&Config { workers: Some(4), ..common::config() })
}

fn subscribers(addr: std::net::SocketAddr, channel: &str, n: usize) -> Vec<Client> {
    (0..n)
        .map(|_| {
            let mut client = Client::connect(addr);
            client.subscribe(channel);
            client
        })
        .collect()
}

fn subscription_count(addr: std::net::SocketAddr, channel: &str) -> Value {
    let (status, body) = rest(addr, "GET", &format!("/apps/app-id/channels/{channel}"), "", &[("info", "subscription_count")]);
    assert_eq!(status, 200, "{body}");
    body
}

#[test]
fn an_event_reaches_every_subscriber_on_every_worker() {
    let node = node();
    let addr = node.local_addr();
    let mut clients = subscribers(addr, "news", 12);
    let (status, body) = publish(addr, &["news"], "headline", r#"{"title":"hello"}"#, None);
    assert_eq!((status, body), (200, json!({})));
    for client in &mut clients {
        let event = client.next_event();
        assert_eq!(event, json!({"event": "headline", "channel": "news", "data": r#"{"title":"hello"}"#}));
    }
    let counters = node.observer().counters();
    assert_eq!(counters.deliveries, 12);
    assert!(counters.broadcasts >= 1, "{counters:?}");
}

#[test]
fn one_call_publishes_to_several_channels_and_excludes_the_publisher() {
    let node = node();
    let addr = node.local_addr();
    let mut a = subscribers(addr, "a", 2);
    let mut b = subscribers(addr, "b", 2);
    let excluded = a[0].socket_id.clone();
    assert_eq!(publish(addr, &["a", "b"], "e", "1", Some(&excluded)).0, 200);
    // A second event, sent to everyone, tells us the excluded client skipped only the first.
    assert_eq!(publish(addr, &["a", "b"], "e", "2", None).0, 200);
    assert_eq!(a[0].next_event()["data"], "2");
    for client in a[1..].iter_mut().chain(b.iter_mut()) {
        assert_eq!(client.next_event()["data"], "1");
        assert_eq!(client.next_event()["data"], "2");
    }
}

#[test]
fn batch_events_arrive_in_order() {
    let node = node();
    let addr = node.local_addr();
    let mut client = Client::connect(addr);
    client.subscribe("x");
    client.subscribe("y");
    let batch: Vec<Value> =
        (0..10).map(|i| json!({"name": "n", "channel": if i % 2 == 0 { "x" } else { "y" }, "data": i.to_string()})).collect();
    let (status, body) = rest(addr, "POST", "/apps/app-id/batch_events", &json!({ "batch": batch }).to_string(), &[]);
    assert_eq!((status, body), (200, json!({})));
    for i in 0..10 {
        let event = client.next_event();
        assert_eq!(event["data"], i.to_string());
        assert_eq!(event["channel"], if i % 2 == 0 { "x" } else { "y" });
    }
}

#[test]
fn channel_queries_count_subscriptions_across_workers() {
    let node = node();
    let addr = node.local_addr();
    let mut news = subscribers(addr, "news-1", 5);
    let _sports = subscribers(addr, "sports", 2);
    assert!(wait_until(Duration::from_secs(5), || subscription_count(addr, "news-1")["subscription_count"] == 5));
    assert_eq!(subscription_count(addr, "news-1"), json!({"occupied": true, "subscription_count": 5}));

    let (status, body) = rest(addr, "GET", "/apps/app-id/channels", "", &[("filter_by_prefix", "news-"), ("info", "subscription_count")]);
    assert_eq!((status, body), (200, json!({"channels": {"news-1": {"subscription_count": 5}}})));
    let (_, body) = rest(addr, "GET", "/apps/app-id/channels", "", &[]);
    assert_eq!(body, json!({"channels": {"news-1": {}, "sports": {}}}));

    // Unsubscribing and disconnecting both vacate.
    news[0].send(json!({"event": "pusher:unsubscribe", "data": {"channel": "news-1"}}));
    news.truncate(1);
    assert!(
        wait_until(Duration::from_secs(5), || subscription_count(addr, "news-1") == json!({"occupied": false, "subscription_count": 0}))
    );
}

#[test]
fn refusals_have_the_right_status_and_a_json_error() {
    let node = node();
    let addr = node.local_addr();
    let expect_error = |(status, body): (u16, Value), expected: u16| {
        assert_eq!(status, expected, "{body}");
        assert!(body["error"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    };

    // A bad signature and a stale timestamp: 401.
    let url = format!(
        "http://{addr}/apps/app-id/channels?auth_key=app-key&auth_timestamp={}&auth_version=1.0&auth_signature=abcd",
        common::unix_now()
    );
    expect_error(common::get(&url), 401);
    let stale = flux::pusher::signature::sign_query(&common::app(), "GET", "/apps/app-id/channels", b"", &[], common::unix_now() - 3600);
    expect_error(common::get(&format!("http://{addr}/apps/app-id/channels?{stale}")), 401);

    // Malformed bodies: 400.
    expect_error(rest(addr, "POST", "/apps/app-id/events", "{not json", &[]), 400);
    expect_error(rest(addr, "POST", "/apps/app-id/events", r#"{"name":"e","channels":["bad channel!"],"data":"x"}"#, &[]), 400);

    // An event over FLUX_MAX_PAYLOAD, and a body over the request limit: 413.
    let big = "x".repeat(Config::default().max_payload + 1);
    expect_error(publish(addr, &["c"], "e", &big, None), 413);
    let huge = "x".repeat(Config::default().max_body_bytes() + 1);
    expect_error(publish(addr, &["c"], "e", &huge, None), 413);

    // Unknown routes and methods.
    expect_error(rest(addr, "GET", "/apps/other-app/channels", "", &[]), 404);
    expect_error(rest(addr, "GET", "/apps/app-id/events", "", &[]), 405);

    // None of it harmed the node.
    let mut client = Client::connect(addr);
    client.subscribe("c");
    assert_eq!(publish(addr, &["c"], "e", "ok", None).0, 200);
    assert_eq!(client.next_event()["data"], "ok");
}
