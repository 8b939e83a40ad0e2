//! Several apps from one apps file, end to end over loopback: each app's clients and REST calls
//! reach only its own channels, each app's settings decide what its clients may do, and a reload
//! adds, changes and disables apps without dropping anyone else.

mod common;

use std::time::Duration;

use common::webhook_receiver::Receiver;
use common::{close_code, open, poll_event, rest_as, AppsFile, Client};
use flux::config::Config;
use flux::pusher::App;
use serde_json::json;
use tungstenite::client::IntoClientRequest;

const STAGING: &str = r#"
[[apps]]
id = "staging"
key = "staging-key"
secret = "staging-secret"
max_connections = 2
allowed_origins = ["*.example.com"]

[[apps]]
id = "production"
key = "production-key"
secret = "production-secret"
enable_client_messages = true
"#;

fn app(id: &str) -> App {
    App { id: id.into(), key: format!("{id}-key"), secret: format!("{id}-secret"), subscription_count_events: false }
}

fn start(file: &AppsFile) -> flux::gateway::Gateway {
    common::start(&Config { apps_file: Some(file.0.clone()), ..common::config() })
}

fn publish(addr: std::net::SocketAddr, app_id: &str, channel: &str, data: &str) -> u16 {
    let body = json!({"name": "news", "channel": channel, "data": data}).to_string();
    rest_as(&app(app_id), addr, "POST", &format!("/apps/{app_id}/events"), &body, &[]).0
}

#[test]
fn the_same_channel_name_in_two_apps_is_two_channels() {
    let file = AppsFile::new(STAGING);
    let node = start(&file);
    let addr = node.local_addr();
    let mut staging = Client::connect_to(addr, "staging-key");
    let mut production = Client::connect_to(addr, "production-key");
    staging.subscribe("updates");
    production.subscribe("updates");

    assert_eq!(publish(addr, "production", "updates", "for production"), 200);
    assert_eq!(production.next_event()["data"], "for production");
    assert_eq!(poll_event(&mut staging, Duration::from_millis(300)), None, "staging's updates is another channel");

    let (status, body) =
        rest_as(&app("production"), addr, "GET", "/apps/production/channels/updates", "", &[("info", "subscription_count")]);
    assert_eq!((status, body["subscription_count"].as_u64()), (200, Some(1)));
    // A call signed with production's secret cannot reach staging.
    let forged = json!({"name": "news", "channel": "updates", "data": "x"}).to_string();
    let (status, _) = rest_as(&app("production"), addr, "POST", "/apps/staging/events", &forged, &[]);
    assert_eq!(status, 401);
    assert_eq!(poll_event(&mut staging, Duration::from_millis(300)), None);
    node.stop();
    node.join();
}

/// Subscribes `client` to private `channel`, signed with `app`'s secret.
fn subscribe_private(client: &mut Client, app: &App, channel: &str) {
    let auth = flux::pusher::signature::channel_auth(app, &client.socket_id, channel, None);
    client.send(json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth}}));
    assert_eq!(client.next_event()["event"], "pusher_internal:subscription_succeeded");
}

#[test]
fn each_app_is_held_to_its_own_settings() {
    let file = AppsFile::new(STAGING);
    let node = start(&file);
    let addr = node.local_addr();
    assert_eq!(close_code(&mut open(addr, "/app/nobody?protocol=7")), Some(4001));

    // Staging takes two connections; the third gets 4004, production is not affected.
    let mut first = Client::connect_to(addr, "staging-key");
    let second = Client::connect_to(addr, "staging-key");
    assert_eq!(close_code(&mut open(addr, "/app/staging-key?protocol=7")), Some(4004), "over staging's max_connections");
    let mut production = Client::connect_to(addr, "production-key");

    // Client events: off for staging (the default), on for production.
    subscribe_private(&mut first, &app("staging"), "private-room");
    first.send(json!({"event": "client-typing", "channel": "private-room", "data": {}}));
    let refused = first.next_event();
    assert_eq!((refused["event"].as_str(), refused["data"]["code"].as_u64()), (Some("pusher:error"), Some(4301)), "{refused}");
    subscribe_private(&mut production, &app("production"), "private-room");
    let mut listener = Client::connect_to(addr, "production-key");
    subscribe_private(&mut listener, &app("production"), "private-room");
    production.send(json!({"event": "client-typing", "channel": "private-room", "data": {"who": "ann"}}));
    assert_eq!(listener.next_event()["event"], "client-typing");
    assert_eq!(poll_event(&mut first, Duration::from_millis(300)), None, "staging's private-room is another channel");

    // A closed connection frees its place in the quota.
    drop(second);
    assert!(common::wait_until(Duration::from_secs(5), || {
        let mut ws = open(addr, "/app/staging-key?protocol=7");
        common::next_event(&mut ws)["event"] == "pusher:connection_established"
    }));
    node.stop();
    node.join();
}

#[test]
fn a_browser_from_an_origin_the_app_does_not_allow_is_refused() {
    let file = AppsFile::new(STAGING);
    let node = start(&file);
    let addr = node.local_addr();
    let connect_from = |key: &str, origin: &str| {
        let mut request = format!("ws://{addr}/app/{key}?protocol=7").into_client_request().expect("request");
        request.headers_mut().insert("Origin", origin.parse().expect("header"));
        let stream = std::net::TcpStream::connect(addr).expect("connect");
        tungstenite::client(request, stream).expect("handshake").0
    };
    assert_eq!(close_code(&mut connect_from("staging-key", "https://evil.test")), Some(4009));
    let mut allowed = connect_from("staging-key", "https://chat.example.com");
    assert_eq!(common::next_event(&mut allowed)["event"], "pusher:connection_established");
    let mut anywhere = connect_from("production-key", "https://evil.test");
    assert_eq!(common::next_event(&mut anywhere)["event"], "pusher:connection_established", "production allows any origin");
    node.stop();
    node.join();
}

#[test]
fn a_reload_adds_and_disables_apps_and_a_bad_file_changes_nothing() {
    let file = AppsFile::new(STAGING);
    let node = start(&file);
    let addr = node.local_addr();
    let mut staging = Client::connect_to(addr, "staging-key");
    let mut production = Client::connect_to(addr, "production-key");
    production.subscribe("updates");
    assert_eq!(close_code(&mut open(addr, "/app/review-key?protocol=7")), Some(4001), "not an app yet");

    // Staging disabled, a review app added, production untouched.
    let reloaded = STAGING.replace("max_connections = 2", "enabled = false")
        + "\n[[apps]]\nid = \"review\"\nkey = \"review-key\"\nsecret = \"review-secret\"\n";
    file.write(&reloaded);
    assert_eq!(node.reload_apps().expect("a good file"), Some(3));
    assert_eq!(close_code(&mut staging.ws), Some(4003), "a disabled app's connections are closed");
    assert_eq!(close_code(&mut open(addr, "/app/staging-key?protocol=7")), Some(4003));
    let (status, _) = rest_as(&app("staging"), addr, "GET", "/apps/staging/channels", "", &[]);
    assert_eq!(status, 403);
    let mut review = Client::connect_to(addr, "review-key");
    review.subscribe("updates");
    assert_eq!(publish(addr, "review", "updates", "hello review"), 200);
    assert_eq!(review.next_event()["data"], "hello review");

    // A bad file is refused whole; the running apps stay, and production never noticed.
    file.write("[[apps]]\nid = \"broken\"\nkey = \"review-key\"\n");
    let refused = node.reload_apps().expect_err("a bad file");
    assert!(refused.to_string().contains("line 1") && refused.to_string().contains("secret"), "{refused}");
    let _still_review = Client::connect_to(addr, "review-key");
    assert_eq!(publish(addr, "production", "updates", "still here"), 200);
    assert_eq!(production.next_event()["data"], "still here");
    node.stop();
    node.join();
}

#[test]
fn each_app_posts_the_webhooks_it_asked_for_signed_with_its_own_secret() {
    let (staging_hooks, production_hooks) = (Receiver::answering(&[]), Receiver::answering(&[]));
    let file = AppsFile::new(&format!(
        r#"{STAGING}
[[apps.webhooks]]
url = "{}"
event_types = ["channel_occupied", "subscription_count"]

[[apps]]
id = "review"
key = "review-key"
secret = "review-secret"

[[apps.webhooks]]
url = "{}"
event_types = ["channel_occupied"]
filter = {{ channel_name_starts_with = "presence-" }}
"#,
        production_hooks.url, staging_hooks.url
    ));
    let node = common::start(&Config { apps_file: Some(file.0.clone()), webhook_batch_ms: 10, ..common::config() });
    let addr = node.local_addr();
    let mut review = Client::connect_to(addr, "review-key");
    review.subscribe("chat");
    let mut production = Client::connect_to(addr, "production-key");
    production.subscribe("chat");

    let post = production_hooks.next(Duration::from_secs(5));
    assert_eq!((post.event_names(), post.json()["events"][0]["channel"].as_str()), (vec!["channel_occupied".to_string()], Some("chat")));
    assert_eq!(post.header("x-pusher-key"), "production-key");
    let signed = flux::pusher::signature::hmac_matches("production-secret", &post.body, post.header("x-pusher-signature"));
    assert!(signed, "signed with production's secret");
    // The review app's webhook wants presence channels only; staging has none.
    assert!(staging_hooks.events_until_quiet(Duration::from_millis(300)).is_empty(), "review's chat is not under its filter");
    common::join_presence_of(&mut review, &app("review"), "presence-room", "ann");
    let post = staging_hooks.next(Duration::from_secs(5));
    assert_eq!(post.json()["events"][0]["channel"], "presence-room");
    assert_eq!(post.header("x-pusher-key"), "review-key");
    assert!(production_hooks.events_until_quiet(Duration::from_millis(300)).is_empty(), "each app's events go to its own webhook");
    node.stop();
    node.join();
}

#[test]
fn over_its_per_second_limits_an_apps_rest_calls_get_429() {
    let file =
        AppsFile::new(&STAGING.replace("enable_client_messages = true", "max_read_requests_per_sec = 2\nmax_backend_events_per_sec = 1"));
    let node = start(&file);
    let addr = node.local_addr();
    let read = || rest_as(&app("production"), addr, "GET", "/apps/production/channels", "", &[]);
    let (first, second, third) = (read(), read(), read());
    assert_eq!((first.0, second.0, third.0), (200, 200, 429), "{third:?}");
    assert!(third.1["error"].as_str().is_some_and(|e| e.contains("max_read_requests_per_sec")), "{third:?}");
    assert_eq!(publish(addr, "production", "news", "one"), 200);
    assert_eq!(publish(addr, "production", "news", "two"), 429);
    assert_eq!(publish(addr, "staging", "news", "staging has no limit"), 200);
    assert_eq!(node.observer().apps().status()[1].counters.rate_limited, 2);
    node.stop();
    node.join();
}

#[test]
fn a_bad_apps_file_stops_the_start_with_the_line_and_the_reason() {
    let file = AppsFile::new(&format!("{STAGING}\n[[apps]]\nid = \"staging\"\nkey = \"k\"\nsecret = \"s\"\n"));
    let error =
        flux::gateway::Gateway::start(&Config { apps_file: Some(file.0.clone()), ..common::config() }, false).err().expect("refused");
    let message = error.to_string();
    assert!(message.contains(&file.0.display().to_string()) && message.contains("line 16") && message.contains("\"staging\""), "{message}");
}
