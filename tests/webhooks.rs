//! Webhooks on loopback: the delivery thread posting to a local receiver (tiny_http), which
//! checks what Pusher's receivers check (body, `time_ms`, `X-Pusher-Key`, the signature), and
//! answers as told (a 500 to force a retry); endpoints that never answer or refuse connections;
//! and a whole node with its dashboard, showing the figures in `/api/stats` and `/metrics`.

mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::wait_until;
use common::webhook_receiver::Receiver;
use flux::apps::{AppConfig, AppWebhook, Apps, WEBHOOK_EVENT_TYPES};
use flux::config::Config;
use flux::dashboard::Dashboard;
use flux::pusher::protocol::{ChannelName, SocketId};
use flux::pusher::signature::hmac_matches;
use flux::pusher::AppIndex;
use flux::webhooks::{DeliverySettings, Emitted, Retry, WebhookEvent, WebhookUrl, Webhooks};
use serde_json::Value;

fn settings() -> DeliverySettings {
    DeliverySettings {
        batch_window: Duration::from_millis(150),
        batch_max: 50,
        queue: 1024,
        timeout: Duration::from_secs(2),
        retry: Retry { attempts: 3, first_delay: Duration::from_millis(100), max_delay: Duration::from_millis(400) },
        drain: Duration::from_secs(1),
    }
}

/// Webhooks delivered as `delivery` says, for the default app, to `url`, wanting every event.
fn start(delivery: DeliverySettings, url: WebhookUrl) -> Webhooks {
    let mut app = AppConfig::from_settings(&Config::default());
    app.webhooks = vec![AppWebhook { url, event_types: WEBHOOK_EVENT_TYPES.iter().map(|t| t.to_string()).collect(), channel_prefix: None }];
    let webhooks = Webhooks::new(delivery);
    webhooks.configure(&Apps::new(vec![app])).expect("starts");
    webhooks
}

fn occupied(channel: &str) -> WebhookEvent {
    WebhookEvent::ChannelOccupied { channel: ChannelName::new(AppIndex(0), channel) }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_millis() as u64
}

const WAIT: Duration = Duration::from_secs(5);

#[test]
fn events_are_posted_batched_and_signed_as_pusher_posts_them() {
    let receiver = Receiver::answering(&[]);
    let webhooks = start(settings(), receiver.url.clone());
    let before = unix_ms();
    let emitted_at = Instant::now();
    let events = [
        occupied("presence-room"),
        WebhookEvent::MemberAdded { channel: ChannelName::new(AppIndex(0), "presence-room"), user_id: "42".into() },
        WebhookEvent::ClientEvent {
            channel: ChannelName::new(AppIndex(0), "presence-room"),
            event: "client-typing".into(),
            data: r#"{"typing":true}"#.into(),
            socket_id: SocketId { high: 123, low: 456 },
            user_id: Some("42".into()),
        },
    ];
    for event in events {
        assert_eq!(webhooks.emit(event), Emitted::Queued);
    }

    let post = receiver.next(WAIT);
    assert!(post.at >= emitted_at + Duration::from_millis(100), "the events waited for the batch window");
    assert_eq!(post.header("content-type"), "application/json");
    assert_eq!(post.header("x-pusher-key"), "app-key");
    assert!(hmac_matches("app-secret", &post.body, post.header("x-pusher-signature")), "the signature verifies");
    let body = post.json();
    let time_ms = body["time_ms"].as_u64().expect("time_ms is a number");
    assert!((before..=unix_ms()).contains(&time_ms), "time_ms {time_ms} is the time of sending");
    assert_eq!(post.event_names(), ["channel_occupied", "member_added", "client_event"], "one POST, in order");
    assert_eq!(body["events"][1]["user_id"], "42");
    assert_eq!(body["events"][2]["socket_id"], "123.456");
    assert_eq!(body["events"][2]["data"], r#"{"typing":true}"#);
    assert!(receiver.posts.recv_timeout(Duration::from_millis(400)).is_err(), "all three shared one POST");

    assert!(wait_until(WAIT, || webhooks.stats().counters.batches_delivered == 1));
    let stats = webhooks.stats();
    assert_eq!((stats.counters.events_queued, stats.counters.events_delivered), (3, 3));
    assert_eq!((stats.counters.attempts_failed, stats.counters.retries, stats.queue_depth), (0, 0, 0));
    webhooks.stop();
}

#[test]
fn a_full_batch_goes_without_waiting_for_the_window() {
    let receiver = Receiver::answering(&[]);
    let webhooks = start(DeliverySettings { batch_max: 2, batch_window: Duration::from_secs(30), ..settings() }, receiver.url.clone());
    for n in 0..4 {
        webhooks.emit(occupied(&format!("c{n}")));
    }
    // Well before the 30 s window: two full batches.
    for expected in [["c0", "c1"], ["c2", "c3"]] {
        let post = receiver.next(WAIT);
        let channels: Vec<String> =
            post.json()["events"].as_array().expect("events").iter().map(|e| e["channel"].as_str().unwrap_or("").into()).collect();
        assert_eq!(channels, expected);
    }
}

#[test]
fn a_failed_post_is_retried_after_a_backoff_with_the_same_body() {
    let receiver = Receiver::answering(&[500]);
    let webhooks = start(settings(), receiver.url.clone());
    webhooks.emit(occupied("retried"));
    let failed = receiver.next(WAIT);
    let retried = receiver.next(WAIT);
    assert_eq!(retried.body, failed.body, "the retry sends the very same signed body");
    assert_eq!(retried.header("x-pusher-signature"), failed.header("x-pusher-signature"));
    assert!(retried.at - failed.at >= Duration::from_millis(100), "the retry waited for the first delay");
    assert!(wait_until(WAIT, || webhooks.stats().counters.batches_delivered == 1));
    let c = webhooks.stats().counters;
    assert_eq!((c.attempts_failed, c.retries, c.events_delivered, c.batches_given_up), (1, 1, 1, 0));
}

#[test]
fn a_refused_connection_is_retried_then_given_up_and_counted() {
    // A port that was just free: connections to it are refused.
    let closed = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port");
    let url: WebhookUrl = format!("http://{closed}/hooks").parse().expect("a valid URL");
    let webhooks = start(DeliverySettings { batch_window: Duration::from_millis(1), ..settings() }, url);
    assert_eq!(webhooks.emit(occupied("nobody-listens")), Emitted::Queued);
    assert!(wait_until(WAIT, || webhooks.stats().counters.batches_given_up == 1));
    let c = webhooks.stats().counters;
    assert_eq!((c.attempts_failed, c.retries, c.events_given_up, c.events_delivered), (3, 2, 1, 0), "{c:?}");
}

#[test]
fn an_endpoint_that_never_answers_does_not_block_emit_and_drops_are_counted() {
    // Connections complete in the kernel's backlog but nothing is ever read or answered: the
    // first POST hangs until its timeout.
    let silent = TcpListener::bind("127.0.0.1:0").expect("a listener");
    let url: WebhookUrl = format!("http://{}/hooks", silent.local_addr().expect("its address")).parse().expect("a valid URL");
    let timeout = Duration::from_secs(3);
    let (queue, batch_max) = (16, 4);
    let webhooks = start(
        DeliverySettings {
            batch_window: Duration::from_millis(1),
            batch_max,
            queue,
            timeout,
            drain: Duration::from_millis(200),
            ..settings()
        },
        url,
    );
    // Let the first batch leave, so the thread is stuck in its POST.
    webhooks.emit(occupied("first"));
    assert!(wait_until(WAIT, || webhooks.stats().counters.events_queued == 1 && webhooks.stats().queue_depth == 0));
    std::thread::sleep(Duration::from_millis(50));

    let emits = 10_000;
    let mut outcomes = HashMap::new();
    for n in 0..emits {
        *outcomes.entry(webhooks.emit(occupied(&format!("c{n}")))).or_insert(0u64) += 1;
    }
    // Every emit has returned while the POST in flight has neither succeeded nor timed out:
    // emit did not wait on the network.
    let c = webhooks.stats().counters;
    assert_eq!((c.attempts_failed, c.batches_delivered), (0, 0), "the POST is still hanging: {c:?}");
    let dropped = outcomes.get(&Emitted::Dropped).copied().unwrap_or(0);
    let queued = outcomes.get(&Emitted::Queued).copied().unwrap_or(0);
    assert_eq!(dropped + queued, emits);
    assert!(queued <= (queue + batch_max) as u64, "only the queue and one batch hold events: {queued}");
    assert_eq!(c.events_dropped, dropped, "every drop is counted");
    assert_eq!(webhooks.stats().queue_depth, queue as u64, "the queue is full");

    // Stopping is bounded by the POST in flight, whatever is queued.
    let stopping = Instant::now();
    webhooks.stop();
    assert!(stopping.elapsed() < timeout + Duration::from_secs(1), "stopped in {:?}", stopping.elapsed());
    let c = webhooks.stats().counters;
    assert_eq!(c.events_given_up, c.events_queued, "every queued event is given up and counted: {c:?}");
    assert_eq!(webhooks.emit(occupied("late")), Emitted::Disabled, "after the stop, events go nowhere");
    drop(silent);
}

/// A gateway whose webhooks go to `receiver`, with the given batch window.
fn gateway_config(receiver: &Receiver, batch_ms: u64) -> Config {
    Config { webhook_url: Some(receiver.url.clone()), webhook_batch_ms: batch_ms, ..common::config() }
}

#[test]
fn a_node_sends_webhooks_and_shows_them_in_stats_and_metrics() {
    let receiver = Receiver::answering(&[]);
    let gateway = common::start(&gateway_config(&receiver, 10));
    let dashboard = Dashboard::start(SocketAddr::from(([127, 0, 0, 1], 0)), gateway.observer().clone()).expect("dashboard starts");
    assert!(gateway.observer().webhooks().enabled);
    assert_eq!(gateway.webhooks().emit(occupied("node")), Emitted::Queued);
    let post = receiver.next(WAIT);
    assert_eq!(post.event_names(), ["channel_occupied"]);
    assert!(wait_until(WAIT, || gateway.observer().webhooks().counters.events_delivered == 1));

    let get = |path: &str| {
        let url = format!("http://{}{path}", dashboard.local_addr());
        ureq::get(&url).call().expect("dashboard answers").into_body().read_to_string().expect("a body")
    };
    let stats: Value = serde_json::from_str(&get("/api/stats")).expect("JSON");
    let webhooks = &stats["webhooks"];
    assert_eq!((webhooks["enabled"].as_bool(), webhooks["events_delivered"].as_u64()), (Some(true), Some(1)), "{stats}");
    let metrics = get("/metrics");
    for line in [
        r#"flux_webhook_events_total{result="queued"} 1"#,
        r#"flux_webhook_events_total{result="delivered"} 1"#,
        r#"flux_webhook_events_total{result="dropped"} 0"#,
        r#"flux_webhook_batches_total{result="delivered"} 1"#,
        "flux_webhook_failed_attempts_total 0",
        "flux_webhook_retries_total 0",
        "flux_webhook_queue_depth 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "/metrics has no {line:?}:\n{metrics}");
    }
    gateway.stop();
    gateway.join();
}

#[test]
fn stopping_a_node_posts_the_webhooks_still_waiting() {
    let receiver = Receiver::answering(&[]);
    // A window far longer than the test: only the stop can send this batch.
    let gateway = common::start(&gateway_config(&receiver, 60_000));
    gateway.webhooks().emit(occupied("last-words"));
    let observer = gateway.observer().clone();
    gateway.stop();
    gateway.join();
    assert_eq!(receiver.next(Duration::from_millis(100)).event_names(), ["channel_occupied"]);
    assert_eq!(observer.webhooks().counters.events_delivered, 1);
}
