//! Cache channels on real sockets: a channel's last event (from the REST API or a client) is
//! replayed to each new subscriber right after its `subscription_succeeded`, on whichever worker
//! it lands; without one the subscriber gets `pusher:cache_miss` and the app's server one
//! `cache_miss` webhook for a crowd of them. Flux's own announcements are never kept.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::webhook_receiver::Receiver;
use common::*;
use flux::config::Config;
use flux::pusher::signature::channel_auth;
use serde_json::{json, Value};

/// Subscribes a new client to `channel` (signed, if it is private) and returns it with what
/// followed `subscription_succeeded`: the kept event or `pusher:cache_miss`.
fn subscribe_cached(addr: SocketAddr, channel: &str) -> (Client, Value) {
    let mut client = Client::connect(addr);
    let auth = channel.starts_with("private-").then(|| channel_auth(&app(), &client.socket_id, channel, None));
    client.send(json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth}}));
    let succeeded = client.next_event();
    assert_eq!(succeeded["event"], "pusher_internal:subscription_succeeded", "{succeeded}");
    let replay = client.next_event();
    assert_eq!(replay["channel"], channel, "{replay}");
    (client, replay)
}

fn is_miss(event: &Value) -> bool {
    event["event"] == "pusher:cache_miss"
}

#[test]
fn the_last_event_is_replayed_to_every_new_subscriber_and_live_events_follow() {
    let gateway = start(&config());
    let addr = gateway.local_addr();
    for n in 1..=3 {
        assert_eq!(publish(addr, &["cache-price"], "tick", &format!("{{\"price\":{n}}}"), None).0, 200);
    }
    // Four subscribers: the two workers take turns, so both answer from their own copy.
    let mut subscribers = Vec::new();
    for _ in 0..4 {
        let (client, replay) = subscribe_cached(addr, "cache-price");
        assert_eq!((replay["event"].as_str(), replay["data"].as_str()), (Some("tick"), Some(r#"{"price":3}"#)), "{replay}");
        subscribers.push(client);
    }
    assert_eq!(publish(addr, &["cache-price"], "tick", r#"{"price":4}"#, None).0, 200);
    for client in &mut subscribers {
        assert_eq!(client.next_event()["data"], r#"{"price":4}"#, "live events follow, not the replay again");
    }
    let (_late, replay) = subscribe_cached(addr, "cache-price");
    assert_eq!(replay["data"], r#"{"price":4}"#);
    let counters = gateway.observer().counters();
    assert_eq!((counters.cache_hits, counters.cache_misses), (5, 0));
    gateway.stop();
    gateway.join();
}

#[test]
fn a_client_event_on_a_private_cache_channel_is_kept_too() {
    let gateway = start(&config());
    let addr = gateway.local_addr();
    let (mut sender, replay) = subscribe_cached(addr, "private-cache-cursor");
    assert!(is_miss(&replay), "{replay}");
    sender.send(json!({"event": "client-moved", "channel": "private-cache-cursor", "data": {"x": 7}}));
    assert!(wait_until(Duration::from_secs(5), || {
        let (_, replay) = subscribe_cached(addr, "private-cache-cursor");
        replay["event"] == "client-moved"
    }));
    let (_, replay) = subscribe_cached(addr, "private-cache-cursor");
    assert_eq!(replay["data"], r#"{"x":7}"#, "{replay}");
    gateway.stop();
    gateway.join();
}

#[test]
fn a_presence_cache_channel_keeps_app_events_but_never_member_announcements() {
    let gateway = start(&config());
    let addr = gateway.local_addr();
    let channel = "presence-cache-room";
    let mut alice = Client::connect(addr);
    join_presence(&mut alice, channel, "alice");
    assert!(is_miss(&alice.next_event()), "nothing was published yet");
    let mut bob = Client::connect(addr);
    join_presence(&mut bob, channel, "bob");
    assert!(is_miss(&bob.next_event()));
    assert_eq!(alice.next_event()["event"], "pusher_internal:member_added");
    let mut carol = Client::connect(addr);
    join_presence(&mut carol, channel, "carol");
    assert!(is_miss(&carol.next_event()), "a member_added is not the channel's last event");
    assert_eq!(publish(addr, &[channel], "topic", "rust", None).0, 200);
    let mut dave = Client::connect(addr);
    join_presence(&mut dave, channel, "dave");
    let replay = dave.next_event();
    assert_eq!((replay["event"].as_str(), replay["data"].as_str()), (Some("topic"), Some("rust")), "{replay}");
    gateway.stop();
    gateway.join();
}

#[test]
fn a_crowd_of_misses_is_one_cache_miss_webhook() {
    let receiver = Receiver::answering(&[]);
    let gateway = start(&Config { webhook_url: Some(receiver.url.clone()), webhook_batch_ms: 20, ..config() });
    let addr = gateway.local_addr();
    let crowd: Vec<Client> = (0..6)
        .map(|_| {
            let (client, replay) = subscribe_cached(addr, "cache-empty");
            assert!(is_miss(&replay), "{replay}");
            client
        })
        .collect();
    let misses: Vec<Value> =
        receiver.events_until_quiet(Duration::from_secs(1)).into_iter().filter(|e| e["name"] == "cache_miss").collect();
    assert_eq!(misses, [json!({"name": "cache_miss", "channel": "cache-empty"})], "six subscribers over two workers, one report");
    assert_eq!(gateway.observer().counters().cache_misses, 6);
    drop(crowd);
    gateway.stop();
    gateway.join();
}
