//! The Pusher protocol over real loopback sockets: connecting, refusals, subscriptions, pings,
//! and bad input of every kind answered without harming other connections.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{close_code, next_event, open, raw_websocket, read_close_code, Client};
use serde_json::json;
use tungstenite::Message;

#[test]
fn a_client_gets_a_socket_id_and_the_activity_timeout() {
    let node = common::start(&common::config());
    let mut ws = open(node.local_addr(), "/app/app-key?protocol=7&client=js&version=8.4.0&flash=false");
    let established = next_event(&mut ws);
    assert_eq!(established["event"], "pusher:connection_established");
    let data: serde_json::Value = serde_json::from_str(established["data"].as_str().unwrap()).unwrap();
    let socket_id = data["socket_id"].as_str().unwrap();
    let (high, low) = socket_id.split_once('.').expect("N.N");
    assert!(high.parse::<u64>().is_ok() && low.parse::<u64>().is_ok(), "{socket_id}");
    assert_eq!(data["activity_timeout"], 120);
}

#[test]
fn socket_ids_are_unique() {
    let node = common::start(&common::config());
    let ids: std::collections::HashSet<String> = (0..20).map(|_| Client::connect(node.local_addr()).socket_id).collect();
    assert_eq!(ids.len(), 20);
}

#[test]
fn an_unknown_key_gets_4001_and_a_close() {
    let node = common::start(&common::config());
    let mut ws = open(node.local_addr(), "/app/wrong-key?protocol=7");
    let error = next_event(&mut ws);
    assert_eq!(error["event"], "pusher:error");
    assert_eq!(error["data"]["code"], 4001);
    assert_eq!(close_code(&mut ws), Some(4001));
}

#[test]
fn unsupported_or_missing_protocol_versions_are_refused() {
    let node = common::start(&common::config());
    for (query, code) in [("?protocol=99", 4007), ("?protocol=4", 4007), ("", 4008), ("?protocol=x", 4006)] {
        let mut ws = open(node.local_addr(), &format!("/app/app-key{query}"));
        let error = next_event(&mut ws);
        assert_eq!(error["data"]["code"], code, "{query}");
        assert_eq!(close_code(&mut ws), Some(code), "{query}");
    }
}

#[test]
fn subscribe_ping_and_unsubscribe() {
    let node = common::start(&common::config());
    let mut client = Client::connect(node.local_addr());
    client.subscribe("my-channel");
    client.send(json!({"event": "pusher:ping", "data": {}}));
    assert_eq!(client.next_event()["event"], "pusher:pong");
    client.send(json!({"event": "pusher:unsubscribe", "data": {"channel": "my-channel"}}));
    // Unsubscribing has no reply; the next ping proves the connection is still fine.
    client.send(json!({"event": "pusher:ping", "data": {}}));
    assert_eq!(client.next_event()["event"], "pusher:pong");
}

#[test]
fn invalid_channel_names_and_client_events_on_public_channels_are_refused() {
    let node = common::start(&common::config());
    let mut client = Client::connect(node.local_addr());
    client.send(json!({"event": "pusher:subscribe", "data": {"channel": "bad name!"}}));
    assert_eq!(client.next_event()["event"], "pusher:subscription_error");
    client.send(json!({"event": "pusher:subscribe", "data": {"channel": "c".repeat(201)}}));
    assert_eq!(client.next_event()["event"], "pusher:subscription_error");
    client.subscribe("public");
    client.send(json!({"event": "client-typing", "channel": "public", "data": {}}));
    let error = client.next_event();
    assert_eq!(error["event"], "pusher:error");
    assert!(error["data"]["message"].as_str().unwrap().contains("private and presence"), "{error}");
}

#[test]
fn junk_messages_get_pusher_error_and_the_connection_survives() {
    let node = common::start(&common::config());
    let mut client = Client::connect(node.local_addr());
    for junk in ["not json", "{}", r#"{"event":"pusher:unknown"}"#, r#"{"event":"pusher:subscribe","data":7}"#] {
        client.ws.send(Message::text(junk)).unwrap();
        assert_eq!(client.next_event()["event"], "pusher:error", "{junk}");
    }
    client.ws.send(Message::binary(vec![1, 2, 3])).unwrap();
    assert_eq!(client.next_event()["event"], "pusher:error");
    client.subscribe("still-fine");
}

#[test]
fn an_unmasked_frame_is_closed_with_1002() {
    let node = common::start(&common::config());
    let mut stream = raw_websocket(node.local_addr());
    stream.write_all(&[0x81, 0x02, b'h', b'i']).unwrap();
    assert_eq!(read_close_code(&mut stream), 1002);
}

#[test]
fn an_oversized_frame_is_closed_with_1009_without_waiting_for_it() {
    let node = common::start(&common::config());
    let mut stream = raw_websocket(node.local_addr());
    // Announce 1 GiB and send only the header: the refusal must come from the header alone.
    let mut header = vec![0x81, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 30).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    stream.write_all(&header).unwrap();
    assert_eq!(read_close_code(&mut stream), 1009);
}

#[test]
fn invalid_utf8_is_closed_with_1007() {
    let node = common::start(&common::config());
    let mut stream = raw_websocket(node.local_addr());
    stream.write_all(&[0x81, 0x82, 0, 0, 0, 0, 0xff, 0xfe]).unwrap();
    assert_eq!(read_close_code(&mut stream), 1007);
}

#[test]
fn malformed_http_gets_400_and_a_close() {
    let node = common::start(&common::config());
    let mut stream = TcpStream::connect(node.local_addr()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.write_all(b"\x16\x03\x01 this is not http\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(response.contains(r#""error""#), "{response}");
}

#[test]
fn a_half_done_handshake_times_out() {
    let mut config = common::config();
    config.handshake_timeout_ms = 300;
    let node = common::start(&config);
    let mut stream = TcpStream::connect(node.local_addr()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.write_all(b"GET /app/app-key?protocol=7 HTTP/1.1\r\nHost: x\r\n").unwrap();
    let started = Instant::now();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(started.elapsed() < Duration::from_secs(4), "closed by the deadline, not by our read timeout");
}

#[test]
fn a_silent_client_is_pinged_then_closed_with_4201() {
    let mut config = common::config();
    config.activity_timeout = 1;
    config.pong_timeout = 1;
    let node = common::start(&config);
    let mut client = Client::connect(node.local_addr());
    // Sweeps run once a second: the ping comes 1-2 s after silence began.
    assert_eq!(client.next_event()["event"], "pusher:ping");
    assert_eq!(close_code(&mut client.ws), Some(4201));
}

#[test]
fn a_client_that_answers_pings_stays_connected() {
    let mut config = common::config();
    config.activity_timeout = 1;
    config.pong_timeout = 1;
    let node = common::start(&config);
    let mut client = Client::connect(node.local_addr());
    for _ in 0..3 {
        assert_eq!(client.next_event()["event"], "pusher:ping");
        client.send(json!({"event": "pusher:pong", "data": {}}));
    }
    client.send(json!({"event": "pusher:ping", "data": {}}));
    assert_eq!(client.next_event()["event"], "pusher:pong");
}

#[test]
fn the_root_and_unknown_paths_answer_json() {
    let node = common::start(&common::config());
    assert_eq!(common::get(&format!("http://{}/", node.local_addr())), (200, json!({"ok": true})));
    let (status, body) = common::get(&format!("http://{}/nope", node.local_addr()));
    assert_eq!(status, 404);
    assert!(body["error"].is_string(), "{body}");
}

/// pusher-js subscribes to all its channels at once on connect: far more requests than the
/// 256-frame ring holds can arrive in one read. Every one must be answered, in order.
#[test]
fn a_burst_of_requests_larger_than_the_ring_gets_every_answer() {
    let node = common::start(&common::config());
    let mut client = Client::connect(node.local_addr());
    let mut burst = Vec::new();
    for i in 0..1000 {
        let request = match i % 4 {
            3 => json!({"event": "pusher:ping", "data": {}}),
            2 => {
                json!({"event": "pusher:subscribe", "data": {"channel": format!("bad channel {i}")}})
            }
            _ => json!({"event": "pusher:subscribe", "data": {"channel": format!("burst-{i}")}}),
        };
        burst.extend(common::masked_text(request.to_string().as_bytes()));
    }
    client.ws.get_mut().write_all(&burst).unwrap();
    for i in 0..1000 {
        let reply = client.next_event();
        let expected = match i % 4 {
            3 => "pusher:pong",
            2 => "pusher:subscription_error",
            _ => "pusher_internal:subscription_succeeded",
        };
        assert_eq!(reply["event"], expected, "answer {i}: {reply}");
        if i % 4 < 2 {
            assert_eq!(reply["channel"], format!("burst-{i}"), "answers come in request order");
        }
    }
    // Every subscription is live: a broadcast to the last channel arrives.
    let (status, _) = common::publish(node.local_addr(), &["burst-997"], "after", "{}", None);
    assert_eq!(status, 200);
    assert_eq!(client.next_event()["event"], "after");
}

#[test]
fn subscriptions_past_the_node_maximum_are_refused_until_one_ends() {
    let node = common::start(&flux::config::Config { max_subscriptions: 3, ..common::config() });
    let mut alice = Client::connect(node.local_addr());
    let mut bob = Client::connect(node.local_addr());
    alice.subscribe("one");
    alice.subscribe("two");
    bob.subscribe("one"); // One connection on one channel is one subscription: three now.
    bob.send(json!({"event": "pusher:subscribe", "data": {"channel": "three"}}));
    let refused = bob.next_event();
    assert_eq!(refused["event"], "pusher:subscription_error", "{refused}");
    assert_eq!(refused["channel"], "three");
    assert_eq!(refused["data"]["type"], "LimitReached");
    assert_eq!(refused["data"]["status"], 503);
    alice.send(json!({"event": "pusher:unsubscribe", "data": {"channel": "two"}}));
    assert!(
        common::wait_until(Duration::from_secs(5), || {
            bob.send(json!({"event": "pusher:subscribe", "data": {"channel": "three"}}));
            bob.next_event()["event"] == "pusher_internal:subscription_succeeded"
        }),
        "an ended subscription makes room"
    );
}

#[test]
fn a_subscription_error_does_not_echo_a_huge_channel_name() {
    let node = common::start(&common::config());
    let mut client = Client::connect(node.local_addr());
    let huge = "x".repeat(10_000);
    client.send(json!({"event": "pusher:subscribe", "data": {"channel": huge}}));
    let error = client.next_event();
    assert_eq!(error["event"], "pusher:subscription_error");
    let echoed = error["channel"].as_str().expect("the channel, cut short");
    assert!(huge.starts_with(echoed) && echoed.len() <= 200, "{} bytes echoed", echoed.len());
}

/// Presence joins are answered by each channel's owner worker, often another one: their replies
/// are promised room before they are asked for, so a burst of joins larger than the ring is
/// answered in full too.
#[test]
fn a_burst_of_presence_joins_larger_than_the_ring_gets_every_member_list() {
    let node = common::start(&common::config());
    let mut client = Client::connect(node.local_addr());
    let channel_data = json!({"user_id": "burst-user"}).to_string();
    let channels: Vec<String> = (0..600).map(|i| format!("presence-burst-{i}")).collect();
    let mut burst = Vec::new();
    for channel in &channels {
        let auth = flux::pusher::signature::channel_auth(&common::app(), &client.socket_id, channel, Some(&channel_data));
        let join = json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth, "channel_data": channel_data}});
        burst.extend(common::masked_text(join.to_string().as_bytes()));
    }
    client.ws.get_mut().write_all(&burst).unwrap();
    let mut answered = std::collections::HashSet::new();
    for _ in &channels {
        let reply = client.next_event();
        assert_eq!(reply["event"], "pusher_internal:subscription_succeeded", "{reply}");
        answered.insert(reply["channel"].as_str().expect("channel").to_string());
    }
    assert_eq!(answered.len(), channels.len(), "one member list per channel");
}
